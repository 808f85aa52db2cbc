//! Quoting for POSIX shells: scripts farm writes are data until a shell runs them.

/// Single-quotes a string for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn quotes_for_posix_shells() {
        assert_eq!(shell_quote("/etc/motd"), "'/etc/motd'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
