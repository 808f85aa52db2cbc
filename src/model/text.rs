//! Text for messages: the last lines of a log or console, an error with its causes. One
//! definition each, so every message that quotes a log or a cause reads the same.

/// The last `lines` lines of `text` (a serial console, qemu's log, a tool's stderr), with
/// trailing blank space left out, for an error message: [`printable`], since a guest
/// writes its console.
pub fn last_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.trim_end().lines().collect();
    printable(&all[all.len().saturating_sub(lines)..].join("\n"))
}

/// [`last_lines`] of bytes that are mostly text (a console may hold anything).
pub fn last_lines_of_bytes(bytes: &[u8], lines: usize) -> String {
    last_lines(&String::from_utf8_lossy(bytes), lines)
}

/// `text` cut to at most `chars` characters, with `…` when it was longer (a progress line
/// that fits its terminal).
pub fn clip(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars.saturating_sub(1)) {
        Some((at, _)) if text[at..].chars().nth(1).is_some() => format!("{}…", &text[..at]),
        _ => text.to_string(),
    }
}

/// The most of another machine's output a message quotes: its end, where the error is.
pub const MAX_QUOTED_BYTES: usize = 64 << 10;

/// Text that another machine wrote (a site's command output, a guest's console), made safe
/// to print on the user's terminal: terminal control sequences (colours, but also those
/// that move the cursor, retitle the window or rewrite what farm printed) are left out,
/// any other control character but newline and tab becomes `�`, and only the last
/// [`MAX_QUOTED_BYTES`] are kept.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_QUOTED_BYTES));
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' | '\t' => out.push(c),
            '\r' => {}
            '\u{1b}' => match chars.peek() {
                // CSI: parameters and intermediates, up to a final byte in @..~.
                Some('[') => {
                    chars.next();
                    for next in chars.by_ref() {
                        if ('@'..='~').contains(&next) {
                            break;
                        }
                    }
                }
                // OSC (a window title, a hyperlink): up to BEL or ESC \\.
                Some(']') => {
                    while let Some(next) = chars.next() {
                        if next == '\u{7}'
                            || (next == '\u{1b}' && chars.next_if_eq(&'\\').is_some())
                        {
                            break;
                        }
                    }
                }
                _ => {
                    chars.next();
                }
            },
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    if out.len() > MAX_QUOTED_BYTES {
        let mut start = out.len() - MAX_QUOTED_BYTES;
        while !out.is_char_boundary(start) {
            start += 1;
        }
        let left_out = start;
        out = format!("… ({left_out} bytes left out)\n{}", &out[start..]);
    }
    out
}

/// `count` things, the noun made plural unless there is one: "1 image", "3 VMs".
pub fn counted(count: usize, noun: &str) -> String {
    match count {
        1 => format!("1 {noun}"),
        n => format!("{n} {noun}s"),
    }
}

/// A byte count as people read it (`1.50 GiB`).
pub fn human_bytes(bytes: u64) -> String {
    indicatif::BinaryBytes(bytes).to_string()
}

/// An error and its causes on one line, joined with `: `, leaving out a cause whose text
/// the line already holds (reqwest, the object store clients and errors that quote their
/// source would otherwise say it twice).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    std::iter::once(error.to_string())
        .chain(unsaid_causes(error))
        .collect::<Vec<_>>()
        .join(": ")
}

/// The causes under `error`, outermost first, leaving out each one whose text the message
/// or a cause before it already quotes: many messages end with their cause (`…: {source}`),
/// and a reader should see each line once.
pub fn unsaid_causes(error: &dyn std::error::Error) -> Vec<String> {
    let mut said = error.to_string();
    let mut unsaid = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !said.contains(&text) {
            said.push('\n');
            said.push_str(&text);
            unsaid.push(text);
        }
        source = cause.source();
    }
    unsaid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_text_keeps_words_and_lines_and_drops_what_steers_a_terminal() {
        let hostile = "ok\tline\r\n\u{1b}[2J\u{1b}[1;31mred\u{1b}[0m \u{1b}]0;pwned\u{7}title \u{1b}]8;;http://x\u{1b}\\link\u{0}\u{8}end";
        assert_eq!(
            printable(hostile),
            "ok\tline\nred title link\u{fffd}\u{fffd}end"
        );
        let long = format!("{}é{}", "x".repeat(MAX_QUOTED_BYTES), "tail");
        let kept = printable(&long);
        assert!(
            kept.starts_with("… (") && kept.ends_with("étail"),
            "{}",
            &kept[..40]
        );
        assert!(kept.len() < MAX_QUOTED_BYTES + 64);
        // An escape cut off at the end of the text ends it.
        assert_eq!(printable("a\u{1b}[12"), "a");
        assert_eq!(printable("a\u{1b}"), "a");
    }

    #[test]
    fn clipped_text_fits_and_says_it_was_cut() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("exactly10!", 10), "exactly10!");
        assert_eq!(clip("a bit longer than ten", 10), "a bit lon…");
        assert_eq!(clip("ééééé", 3), "éé…");
    }

    #[test]
    fn counts_say_one_thing_and_many_things() {
        assert_eq!(counted(1, "target"), "1 target");
        assert_eq!(counted(0, "VM"), "0 VMs");
        assert_eq!(counted(3, "network"), "3 networks");
    }

    #[test]
    fn last_lines_keeps_the_end_without_trailing_blank_lines() {
        assert_eq!(last_lines("a\nb\nc\n\n", 2), "b\nc");
        assert_eq!(last_lines("a\nb", 5), "a\nb");
        assert_eq!(last_lines("", 3), "");
        assert_eq!(last_lines_of_bytes(b"x\xffy\nz", 1), "z");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("{message}")]
    struct Layer {
        message: String,
        #[source]
        source: Option<Box<Layer>>,
    }

    fn layer(message: &str, source: Option<Layer>) -> Layer {
        Layer {
            message: message.into(),
            source: source.map(Box::new),
        }
    }

    #[test]
    fn error_chain_joins_causes_and_skips_the_ones_already_quoted() {
        let inner = layer("connection refused", None);
        let middle = layer("error sending request: connection refused", Some(inner));
        let outer = layer("Cannot fetch `x`", Some(middle));
        assert_eq!(
            error_chain(&outer),
            "Cannot fetch `x`: error sending request: connection refused"
        );
        assert_eq!(
            unsaid_causes(&outer),
            ["error sending request: connection refused"]
        );
        let quoted = layer(
            "Cannot read `f`: Is a directory",
            Some(layer("Is a directory", None)),
        );
        assert!(unsaid_causes(&quoted).is_empty());
    }
}
