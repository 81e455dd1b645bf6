//! Address text shared by every crate: an IPv6 literal in brackets.

/// `host` without the brackets of an IPv6 literal (`[2001:db8::1]`).
pub fn unbracketed(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

#[cfg(test)]
mod tests {
    #[test]
    fn brackets_go_and_nothing_else_does() {
        assert_eq!(super::unbracketed("[::1]"), "::1");
        assert_eq!(super::unbracketed("::1"), "::1");
        assert_eq!(super::unbracketed("[::1"), "[::1");
        assert_eq!(super::unbracketed("example.com"), "example.com");
    }
}
