//! Target-controlled text made safe for a terminal and for line formats.
//!
//! A profiled program chooses its command line, and its binaries choose
//! their symbol and file names. memscope runs as root and prints those on
//! the operator's terminal, where an escape sequence could rewrite earlier
//! lines, retitle the window or worse, and writes them into line-based
//! files, where a newline would forge a line.

use std::{borrow::Cow, fmt::Write as _};

/// `text` with every C0 control character (U+0000..U+001F), DEL (U+007F)
/// and C1 control character (U+0080..U+009F) written as `\xNN`, its code
/// point in two lowercase hex digits; everything else unchanged.
///
/// NB: a backslash is left as it is, so a name that already contains the
/// four characters `\x1b` looks like an escaped ESC. That is only ambiguous,
/// never dangerous, and real names keep their backslashes readable;
/// report.json keeps the raw string for whoever needs it exactly.
pub fn escape_control(text: &str) -> Cow<'_, str> {
    // `char::is_control` is Unicode's `Cc` category: C0, DEL and C1 exactly.
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            // Writing to a String cannot fail.
            let _ = write!(escaped, "\\x{:02x}", u32::from(c));
        } else {
            escaped.push(c);
        }
    }
    Cow::Owned(escaped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_escape_sequence_is_shown_not_sent() {
        assert_eq!(escape_control("\x1b[31mred"), "\\x1b[31mred");
    }

    #[test]
    fn newline_tab_and_nul_become_hex() {
        assert_eq!(escape_control("a\nb\tc\0"), "a\\x0ab\\x09c\\x00");
    }

    #[test]
    fn del_and_c1_controls_become_hex() {
        assert_eq!(
            escape_control("\u{7f}\u{80}\u{9b}\u{9f}"),
            "\\x7f\\x80\\x9b\\x9f"
        );
    }

    #[test]
    fn printable_text_is_borrowed_unchanged() {
        let text = "operator new(unsigned long) <- a;b \\ é \u{a0} \u{a0}";
        assert!(matches!(escape_control(text), Cow::Borrowed(t) if t == text));
    }
}
