//! The `date` header of the responses the HTTP/1.1 fast path writes. RFC 9110 §6.6.1 asks
//! an origin server to send one (the proxy's own answers) and a forwarding proxy to add one
//! to a response that came without it, as hyper's server does on the other path.

use std::cell::RefCell;
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// `Sun, 06 Nov 1994 08:49:37 GMT`: IMF-fixdate is always this long.
const DATE_LEN: usize = 29;

/// The formatted date of the current second, per worker thread: formatting it for every
/// response would cost more than the rest of a header.
struct CachedDate {
    /// None until the first response; then the second `text` shows.
    second: Option<u64>,
    text: [u8; DATE_LEN],
}

thread_local! {
    static CACHED: RefCell<CachedDate> = const { RefCell::new(CachedDate { second: None, text: [0; DATE_LEN] }) };
}

/// Appends `date: <now>\r\n` to a response head.
pub(crate) fn push_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|cached| {
        if cached.second != Some(second) {
            let mut text = &mut cached.text[..];
            let _ = write!(text, "{}", httpdate::HttpDate::from(now));
            cached.second = Some(second);
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&cached.text);
        out.extend_from_slice(b"\r\n");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_current_second_as_an_http_date() {
        let before = SystemTime::now();
        let mut out = Vec::new();
        push_date(&mut out);
        push_date(&mut out);
        let text = std::str::from_utf8(&out).unwrap();
        let lines: Vec<&str> = text.split_terminator("\r\n").collect();
        assert_eq!(lines.len(), 2);
        let value = lines[0].strip_prefix("date: ").expect("a date header");
        let parsed = httpdate::parse_http_date(value).expect("an IMF-fixdate");
        let age = before.duration_since(parsed).unwrap_or_default();
        assert!(age.as_secs() <= 1, "{value} is not the current second");
        assert!(lines[1].starts_with("date: "));
    }
}
