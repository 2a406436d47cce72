//! A certificate as the store keeps it and the worker serves it: one PEM file with the private
//! key (PKCS#8) and the chain (leaf first), checked before it is served or stored: the leaf
//! names the domain, the key is the leaf's, and its dates parse.
//!
//! A first line `# source: ...` says where it came from (an ACME directory, or mkcert and its
//! CAROOT), so a certificate from another source (local mode's, in release mode) is replaced
//! rather than served. PEM readers skip the line; a file without it counts as from anywhere.

use core_server_proto::acme_ipc::CertificateStatus;
use core_server_proto::domain::Domain;
use rustls_pki_types::pem::{self as pki_pem, PemObject, SectionKind};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

const SOURCE: &str = "# source: ";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER.
    pub key: Vec<u8>,
    pub source: Option<String>,
    /// Seconds since the epoch.
    pub not_before: u64,
    pub not_after: u64,
    pub issuer: String,
}

impl Certificate {
    /// Checks a key and chain for `name`.
    pub fn new(
        name: &Domain,
        source: Option<String>,
        key: Vec<u8>,
        chain: Vec<Vec<u8>>,
    ) -> Result<Certificate, String> {
        let leaf = chain.first().ok_or("no certificate")?;
        let (_, parsed) =
            X509Certificate::from_der(leaf).map_err(|e| format!("unreadable certificate: {e}"))?;
        let names = dns_names(&parsed);
        if !names.iter().any(|n| n.eq_ignore_ascii_case(name.as_str())) {
            return Err(format!("the certificate is for {names:?}, not {name}"));
        }
        let key_pair = rcgen::KeyPair::try_from(key.as_slice())
            .map_err(|e| format!("unusable private key: {e}"))?;
        if rcgen::PublicKeyData::subject_public_key_info(&key_pair) != parsed.public_key().raw {
            return Err("the private key does not belong to the certificate".into());
        }
        let validity = parsed.validity();
        let (not_before, not_after) = (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        );
        if not_before < 0 || not_after <= not_before {
            return Err(format!(
                "the certificate's dates make no sense ({not_before}..{not_after})"
            ));
        }
        let issuer = parsed
            .issuer()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map_or_else(|| parsed.issuer().to_string(), str::to_owned);
        Ok(Certificate {
            chain,
            key,
            source,
            not_before: not_before as u64,
            not_after: not_after as u64,
            issuer,
        })
    }

    /// Reads a store file (or any PEM with one PKCS#8 key and the chain, leaf first).
    pub fn from_pem(name: &Domain, pem: &[u8]) -> Result<Certificate, String> {
        let source = std::str::from_utf8(pem)
            .ok()
            .and_then(|text| text.lines().next())
            .and_then(|line| line.strip_prefix(SOURCE))
            .map(str::to_owned);
        let (mut keys, mut chain) = (Vec::new(), Vec::new());
        for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem) {
            match section.map_err(malformed)? {
                (SectionKind::PrivateKey, der) => keys.push(der),
                (SectionKind::Certificate, der) => chain.push(der),
                (kind, _) => return Err(format!("unexpected {kind:?} in the PEM")),
            }
        }
        if keys.len() != 1 {
            return Err(format!(
                "{} PKCS#8 private keys (\"BEGIN PRIVATE KEY\") where one was expected",
                keys.len()
            ));
        }
        Certificate::new(name, source, keys.pop().unwrap_or_default(), chain)
    }

    /// The store file: the source line, the key, then the chain.
    pub fn to_pem(&self) -> Vec<u8> {
        let mut pem = String::new();
        if let Some(source) = &self.source {
            pem.push_str(&format!("{SOURCE}{source}\n"));
        }
        pem.push_str(&encode("PRIVATE KEY", &self.key));
        for der in &self.chain {
            pem.push_str(&encode("CERTIFICATE", der));
        }
        pem.into_bytes()
    }

    /// Whether it may be served at `now`.
    pub fn is_current(&self, now: u64) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// Whether it came from `source` (or from no source said).
    pub fn is_from(&self, source: &str) -> bool {
        self.source.as_deref().is_none_or(|s| s == source)
    }
}

/// What is wrong with a PEM file, in words: the parser's message shows lines as byte values.
fn malformed(e: pki_pem::Error) -> String {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_owned();
    match e {
        pki_pem::Error::MissingSectionEnd { end_marker } => {
            let line = format!("-----END {}-----", text(&end_marker));
            format!("malformed PEM: no {line:?} line (cut short?)")
        }
        pki_pem::Error::IllegalSectionStart { line } => {
            format!("malformed PEM: a bad section start {:?}", text(&line))
        }
        other => format!("malformed PEM: {other}"),
    }
}

/// The DNS names of the first certificate in `pem` (a store file's leaf); none if it does not
/// read.
pub fn leaf_names(pem: &[u8]) -> Vec<String> {
    let leaf = <(SectionKind, Vec<u8>)>::pem_slice_iter(pem)
        .map_while(Result::ok)
        .find_map(|(kind, der)| (kind == SectionKind::Certificate).then_some(der));
    let Some(leaf) = leaf else {
        return Vec::new();
    };
    match X509Certificate::from_der(&leaf) {
        Ok((_, parsed)) => dns_names(&parsed).into_iter().map(str::to_owned).collect(),
        Err(_) => Vec::new(),
    }
}

fn dns_names<'a>(certificate: &'a X509Certificate) -> Vec<&'a str> {
    match certificate.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(dns) => Some(*dns),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The status line of `name`: its certificate, if any, and its last failure, if any.
pub fn status(
    name: &Domain,
    certificate: Option<&Certificate>,
    last_error: Option<String>,
    next_try: Option<u64>,
) -> CertificateStatus {
    CertificateStatus {
        name: name.to_string(),
        issuer: certificate.map(|c| c.issuer.clone()),
        not_after: certificate.map(|c| c.not_after),
        last_error,
        next_try,
    }
}

fn encode(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der), config)
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A self-signed certificate for `names`, valid from `not_before` to `not_after`.
    pub fn make(names: &[&str], not_before: u64, not_after: u64) -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        params.not_before = epoch + std::time::Duration::from_secs(not_before);
        params.not_after = epoch + std::time::Duration::from_secs(not_after);
        let cert = params.self_signed(&key).unwrap();
        (key.serialize_der(), cert.der().to_vec())
    }

    fn name(s: &str) -> Domain {
        Domain::parse(s).unwrap()
    }

    #[test]
    fn pem_round_trip_keeps_everything() {
        let (key, leaf) = make(&["a.example"], 1_000_000_000, 2_000_000_000);
        let (_, other) = make(&["ca.example"], 1_000_000_000, 2_000_000_000);
        let cert = Certificate::new(
            &name("a.example"),
            Some("acme https://ca/dir".into()),
            key,
            vec![leaf, other],
        )
        .unwrap();
        assert_eq!(cert.not_before, 1_000_000_000);
        assert_eq!(cert.not_after, 2_000_000_000);
        assert_eq!(cert.issuer, "rcgen self signed cert");
        let pem = cert.to_pem();
        assert!(pem.starts_with(b"# source: acme https://ca/dir\n-----BEGIN PRIVATE KEY-----\n"));
        assert_eq!(
            Certificate::from_pem(&name("a.example"), &pem).unwrap(),
            cert
        );
        assert!(cert.is_current(1_500_000_000));
        assert!(!cert.is_current(2_000_000_000));
        assert!(cert.is_from("acme https://ca/dir"));
        assert!(!cert.is_from("mkcert /x"));
    }

    #[test]
    fn a_file_without_source_or_from_openssl_reads() {
        let (key, leaf) = make(&["b.example"], 1_000_000_000, 2_000_000_000);
        let cert = Certificate::new(&name("b.example"), None, key, vec![leaf]).unwrap();
        let pem = cert.to_pem();
        let read = Certificate::from_pem(&name("B.example"), &pem).unwrap();
        assert_eq!(read.source, None);
        assert!(read.is_from("anything"));
        // The same text as openssl prints it.
        let out = std::process::Command::new("openssl")
            .args(["x509", "-inform", "DER", "-outform", "PEM"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(&cert.chain[0])?;
                child.wait_with_output()
            });
        if let Ok(out) = out {
            let text = String::from_utf8(pem).unwrap();
            assert!(text.contains(std::str::from_utf8(&out.stdout).unwrap()));
        }
    }

    #[test]
    fn mismatches_are_refused_with_a_reason() {
        let (key, leaf) = make(&["a.example"], 1_000_000_000, 2_000_000_000);
        let (other_key, _) = make(&["a.example"], 1_000_000_000, 2_000_000_000);
        let wrong_name =
            Certificate::new(&name("b.example"), None, key.clone(), vec![leaf.clone()]);
        assert!(wrong_name.unwrap_err().contains("not b.example"));
        let wrong_key = Certificate::new(&name("a.example"), None, other_key, vec![leaf.clone()]);
        assert!(wrong_key.unwrap_err().contains("does not belong"));
        assert!(Certificate::new(&name("a.example"), None, key.clone(), vec![]).is_err());
        let cert = Certificate::new(&name("a.example"), None, key, vec![leaf]).unwrap();
        let pem = String::from_utf8(cert.to_pem()).unwrap();
        let no_key = pem.split("-----BEGIN CERTIFICATE").nth(1).unwrap();
        let no_key = format!("-----BEGIN CERTIFICATE{no_key}");
        assert!(Certificate::from_pem(&name("a.example"), no_key.as_bytes())
            .unwrap_err()
            .contains("0 PKCS#8"));
        let truncated = &pem.as_bytes()[..pem.len() - 30];
        let error = Certificate::from_pem(&name("a.example"), truncated).unwrap_err();
        assert_eq!(
            error,
            "malformed PEM: no \"-----END CERTIFICATE-----\" line (cut short?)"
        );
    }
}
