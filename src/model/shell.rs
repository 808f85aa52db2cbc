//! Quoting for POSIX shells: scripts farm writes are data until a shell runs them. The one
//! place farm quotes for `sh`; everything that builds a script or shows a command line
//! quotes through here.

use std::ffi::OsStr;
use std::path::Path;

/// Single-quotes a string for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Single-quotes a path for a POSIX shell.
pub fn quote_path(path: &Path) -> String {
    shell_quote(&path.to_string_lossy())
}

/// A word as `sh` would need it: bare when it is plainly safe, single-quoted otherwise, so
/// a logged command line reads as typed and can still be pasted into a shell.
pub fn quote_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./,:=@%+".contains(c));
    if plain {
        word.to_string()
    } else {
        shell_quote(word)
    }
}

/// A program and its arguments as one line a user could paste into a shell.
pub fn command_line<A: AsRef<OsStr>>(program: &OsStr, args: &[A]) -> String {
    std::iter::once(program)
        .chain(args.iter().map(AsRef::as_ref))
        .map(|arg| quote_word(&arg.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a remote shell is given for `farm exec VM -- ARGS…`: one argument is a command line
/// of its own (`'echo $HOME; ls'`), several are a command and its arguments as given, each
/// quoted (`grep -q 'a b' /etc/motd` greps for `a b`; ssh alone would split it).
pub fn remote_command(args: &[String]) -> String {
    match args {
        [line] => line.clone(),
        _ => args
            .iter()
            .map(|a| quote_word(a))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_posix_shells() {
        assert_eq!(shell_quote("/etc/motd"), "'/etc/motd'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(quote_path(Path::new("/var/a b")), "'/var/a b'");
    }

    #[test]
    fn a_remote_command_keeps_its_arguments_whole() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(remote_command(&args(&["echo $HOME; ls"])), "echo $HOME; ls");
        assert_eq!(
            remote_command(&args(&[
                "grep",
                "-q",
                "project_id: example_03",
                "/etc/motd"
            ])),
            "grep -q 'project_id: example_03' /etc/motd"
        );
    }

    #[test]
    fn words_stay_bare_when_plainly_safe() {
        assert_eq!(quote_word("/usr/sbin/mkfs.ext4"), "/usr/sbin/mkfs.ext4");
        assert_eq!(
            quote_word("--aptopt=Acquire::Retries \"3\""),
            "'--aptopt=Acquire::Retries \"3\"'"
        );
        assert_eq!(quote_word("it's"), r"'it'\''s'");
        assert_eq!(quote_word(""), "''");
        assert_eq!(
            command_line(OsStr::new("qemu-img"), &["info", "a b.qcow2"]),
            "qemu-img info 'a b.qcow2'"
        );
    }
}
