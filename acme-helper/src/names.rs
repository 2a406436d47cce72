//! Defence in depth for names: a name becomes part of a file path or of mkcert's command line
//! only through [`checked`], which validates it again by the rules the worker and the supervisor
//! apply (no `/`, no `..`, no leading `-` or `.`, no NUL), whatever way it came in.

use std::io;

use core_server_proto::domain::Domain;

/// `name` as text, once it has passed [`Domain::parse`] again unchanged.
pub fn checked(name: &Domain) -> io::Result<&str> {
    match Domain::parse(name.as_str()) {
        Ok(again) if again == *name => Ok(name.as_str()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing {:?}: not a valid domain name", name.as_str()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core_server_proto::acme_ipc::WorkerToAcme;

    #[test]
    fn valid_names_pass_unchanged() {
        let name = Domain::parse("Example.COM").unwrap();
        assert_eq!(checked(&name).unwrap(), "example.com");
    }

    /// Names reach the helper only inside IPC messages: a crafted one is refused while the
    /// message is decoded, before any code of the helper sees it.
    #[test]
    fn crafted_names_never_decode() {
        for bad in [
            "../x", "a/b", "-rf", "--help", ".hidden", "a\0b", "x..y", "", "1.2.3.4",
        ] {
            let wire = postcard::to_stdvec(&(0u8, bad)).unwrap();
            assert!(
                postcard::from_bytes::<WorkerToAcme>(&wire).is_err(),
                "{bad:?} decoded"
            );
        }
        let wire = postcard::to_stdvec(&(0u8, "ok.example")).unwrap();
        assert!(postcard::from_bytes::<WorkerToAcme>(&wire).is_ok());
    }
}
