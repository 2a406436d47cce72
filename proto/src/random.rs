//! Randomness from the kernel (`getrandom(2)`), and the hex form random and hashed bytes are
//! written in: tunnel tokens, the tunnel control nonce, the routes journal's id.

use std::io;

/// Fills `bytes` from the kernel's random source.
pub fn fill(bytes: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < bytes.len() {
        filled +=
            rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty())?;
    }
    Ok(())
}

/// 128 random bits in hex: an id no one can guess or repeat.
pub fn hex_id() -> io::Result<String> {
    let mut bytes = [0; 16];
    fill(&mut bytes)?;
    Ok(hex(&bytes))
}

/// `bytes` as lowercase hex, two digits each.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
