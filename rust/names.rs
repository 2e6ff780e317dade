//! File names: the bare names taken from URLs and servers, the names of the
//! internal files surefetch derives from a user's file name, and the filename
//! of a `Content-Disposition` header (RFC 6266, with RFC 5987 `filename*`).
//!
//! The one rule for a name that comes from outside (a URL, a server) is
//! [`bare_name`]; Python uses it through `_core.bare_name`.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use percent_encoding::percent_decode_str;

/// The longest file name (in bytes) Linux filesystems accept.
pub const NAME_MAX: usize = 255;

/// `raw` reduced to a bare file name that stays in its directory, or "" when
/// nothing is left:
/// - only what follows the last `/` or `\` is kept (`../../etc/passwd` → `passwd`);
/// - control characters (C0 and DEL) are dropped, surrounding whitespace trimmed;
/// - leading `-` are dropped, so the name is never read as an option;
/// - `.` and `..` are nothing;
/// - a name longer than `NAME_MAX` bytes is cut to fit, on a character boundary,
///   in the middle: its extensions (`.tar.gz`, up to `KEPT_EXTENSION` bytes) stay.
pub fn bare_name(raw: &str) -> String {
    let clean: String = raw.chars().filter(|c| !is_control(*c)).collect();
    let last = clean.rsplit(['/', '\\']).next().unwrap_or_default();
    let name = last
        .trim()
        .trim_start_matches(|c: char| c == '-' || c.is_whitespace());
    if name == "." || name == ".." {
        return String::new();
    }
    if name.len() <= NAME_MAX {
        return name.to_owned();
    }
    let extension = extension_of(name);
    let cut = char_boundary(name.as_bytes(), NAME_MAX - extension.len());
    format!("{}{extension}", name[..cut].trim_end())
}

/// The longest an extension kept by a cut (`bare_name`) may be, in bytes.
const KEPT_EXTENSION: usize = 32;

/// What follows the first `.` of the last `KEPT_EXTENSION` bytes of `name` (the
/// extensions, `.tar.gz`), or "" when there is none.
fn extension_of(name: &str) -> &str {
    let from = name.len() - KEPT_EXTENSION.min(name.len());
    match name
        .char_indices()
        .skip_while(|(i, _)| *i < from)
        .find(|(_, c)| *c == '.')
    {
        Some((at, _)) => &name[at..],
        None => "",
    }
}

/// Characters a name never keeps: C0 and C1 controls, DEL, and the invisible
/// format characters that reorder or hide text (bidi overrides and isolates, zero
/// widths, the BOM), with which `%E2%80%AEtxt.exe` would display as `exe.txt`.
fn is_control(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{1f}'
        | '\u{7f}'..='\u{9f}'
        | '\u{61c}'
        | '\u{200b}'..='\u{200f}'
        | '\u{202a}'..='\u{202e}'
        | '\u{2060}'..='\u{2069}'
        | '\u{feff}')
}

/// The largest `n <= limit` at which `bytes` can be cut without splitting a
/// UTF-8 character (a name that is not UTF-8 is cut before a continuation byte too).
fn char_boundary(bytes: &[u8], limit: usize) -> usize {
    if bytes.len() <= limit {
        return bytes.len();
    }
    let mut n = limit;
    while n > 0 && bytes[n] & 0b1100_0000 == 0b1000_0000 {
        n -= 1;
    }
    n
}

/// Hex digits of the hash that keeps shortened names apart.
const HASH_HEX: usize = 16;

/// A stem for names of the form `stem + suffix`, with suffixes of at most
/// `reserve` bytes: `name` itself when `name` plus `reserve` bytes fit in
/// `NAME_MAX`; else a prefix of `name` (cut on a character boundary), `~` and
/// 16 hex digits of a hash of the whole name, so that different long names
/// keep different stems.
pub fn stem(name: &[u8], reserve: usize) -> Vec<u8> {
    let budget = NAME_MAX.saturating_sub(reserve);
    if name.len() <= budget {
        return name.to_vec();
    }
    let hash = xxhash_rust::xxh3::xxh3_64(name);
    let keep = char_boundary(name, budget.saturating_sub(1 + HASH_HEX));
    let mut stem = name[..keep].to_vec();
    stem.extend_from_slice(format!("~{hash:0width$x}", width = HASH_HEX).as_bytes());
    stem
}

/// `name` + `suffix`, as a name that fits in `NAME_MAX` bytes (see [`stem`]).
pub fn fit_name(name: &OsStr, suffix: &str) -> OsString {
    let mut fitted = stem(name.as_bytes(), suffix.len());
    fitted.extend_from_slice(suffix.as_bytes());
    OsString::from_vec(fitted)
}

/// The file name a `Content-Disposition` header value gives, decoded but not
/// yet reduced to a bare name: `filename*=UTF-8''...` (RFC 5987) when present
/// and in UTF-8 or ISO-8859-1, else `filename=` (quoted or a token). Raw bytes in the header
/// are read as UTF-8 when they are, else as ISO-8859-1.
pub fn content_disposition_filename(value: &[u8]) -> Option<String> {
    let text = match std::str::from_utf8(value) {
        Ok(text) => text.to_owned(),
        Err(_) => value.iter().map(|b| char::from(*b)).collect(),
    };
    let mut plain = None;
    let mut extended = None;
    for (name, value) in parameters(&text) {
        if name.eq_ignore_ascii_case("filename") && plain.is_none() {
            plain = Some(value);
        } else if name.eq_ignore_ascii_case("filename*") && extended.is_none() {
            extended = Some(decode_ext_value(&value));
        }
    }
    extended.flatten().or(plain)
}

/// The bare name (see [`bare_name`]) a `Content-Disposition` header value
/// gives; `None` when it gives none or it reduces to nothing.
pub fn server_name(value: &[u8]) -> Option<String> {
    content_disposition_filename(value)
        .map(|raw| bare_name(&raw))
        .filter(|name| !name.is_empty())
}

/// RFC 5987 `charset'language'percent-encoded`, in the two charsets every
/// recipient must support (§3.2.1): UTF-8 and ISO-8859-1; others give `None`.
fn decode_ext_value(value: &str) -> Option<String> {
    let mut parts = value.splitn(3, '\'');
    let charset = parts.next()?.trim();
    let _language = parts.next()?;
    let bytes = percent_decode_str(parts.next()?);
    if charset.eq_ignore_ascii_case("utf-8") {
        bytes.decode_utf8().ok().map(|s| s.into_owned())
    } else if charset.eq_ignore_ascii_case("iso-8859-1") {
        // Each byte is the code point of the same number (ISO-8859-1 is Unicode's first 256).
        Some(bytes.map(char::from).collect())
    } else {
        None
    }
}

/// The `name=value` parameters after the disposition type, values unquoted
/// (`\x` in a quoted string is `x`). Stops at a quoted string that never ends.
fn parameters(text: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    // The disposition type (`attachment`, `inline`) comes first and has no `=`.
    let mut rest = match text.split_once(';') {
        Some((first, rest)) if !first.contains('=') => rest,
        _ => text,
    };
    loop {
        rest = rest.trim_start_matches(|c: char| c == ';' || c.is_whitespace());
        if rest.is_empty() {
            return found;
        }
        let Some(eq) = rest
            .find(['=', ';'])
            .filter(|&i| rest[i..].starts_with('='))
        else {
            // A parameter without a value: skip it.
            rest = rest.find(';').map_or("", |i| &rest[i..]);
            continue;
        };
        let name = rest[..eq].trim().to_owned();
        let after = rest[eq + 1..].trim_start();
        if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, c)) => value.push(c),
                        None => return found,
                    },
                    Some((i, '"')) => break i + 1,
                    Some((_, c)) => value.push(c),
                    None => return found,
                }
            };
            found.push((name, value));
            rest = &quoted[end..];
            // Anything between the closing quote and the next `;` is garbage.
            rest = rest.find(';').map_or("", |i| &rest[i..]);
        } else {
            let end = after.find(';').unwrap_or(after.len());
            found.push((name, after[..end].trim().to_owned()));
            rest = &after[end..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_names() {
        let long = "é".repeat(200); // 400 bytes
        let cases: &[(&str, &str)] = &[
            ("model.bin", "model.bin"),
            ("a b.txt", "a b.txt"),
            ("  padded  ", "padded"),
            ("../../etc/passwd", "passwd"),
            ("..\\..\\windows\\system.ini", "system.ini"),
            ("/absolute/path", "path"),
            ("dir/", ""),
            (".", ""),
            ("..", ""),
            ("a/..", ""),
            ("", ""),
            ("   ", ""),
            ("-rf", "rf"),
            ("--help", "help"),
            ("- -x", "x"),
            ("---", ""),
            ("a-b", "a-b"),
            (".hidden", ".hidden"),
            ("line\nbreak", "linebreak"),
            ("nul\0byte", "nulbyte"),
            ("tab\there", "tabhere"),
            ("del\u{7f}ete", "delete"),
            ("\u{1b}[31mred", "[31mred"),
            ("c1\u{85}\u{9b}x", "c1x"),
            ("\u{202e}txt.exe", "txt.exe"),
            ("a\u{200b}b\u{2066}c\u{feff}", "abc"),
            ("ünïcödé.txt", "ünïcödé.txt"),
            ("日本語.bin", "日本語.bin"),
            (".surefetch", ".surefetch"),
        ];
        for (raw, expected) in cases {
            assert_eq!(bare_name(raw), *expected, "{raw:?}");
        }
        // `-.`, `-..` lose their dash first and are then the plain names `.`
        // and `..`: those must be nothing too.
        assert_eq!(bare_name("-."), "");
        assert_eq!(bare_name("-.."), "");
        let cut = bare_name(&long);
        assert_eq!(
            cut.len(),
            254,
            "cut before the character that would cross 255"
        );
        assert!(long.starts_with(&cut));
        // A cut keeps the extensions: the name still says what the file is.
        let archive = format!("{}.tar.gz", "r".repeat(300));
        let kept = bare_name(&archive);
        assert_eq!(kept.len(), NAME_MAX);
        assert!(kept.ends_with("rrr.tar.gz"), "{kept}");
        let dotted = format!("{}.{}", "a".repeat(260), "b".repeat(40)); // no short extension
        assert_eq!(bare_name(&dotted).len(), NAME_MAX);
        assert!(dotted.starts_with(&bare_name(&dotted)));
    }

    #[test]
    fn stems_fit_with_their_suffix() {
        let suffix = ".part.json.tmp";
        for name in [
            "a".to_owned(),
            "x".repeat(200),
            "x".repeat(241),
            "x".repeat(242),
            "x".repeat(250),
            "x".repeat(255),
            "é".repeat(125),                 // 250 bytes, two per character
            "日".repeat(85),                 // 255 bytes, three per character
            format!("a{}", "😀".repeat(63)), // 253 bytes, four per character
        ] {
            let fitted = fit_name(OsStr::new(&name), suffix);
            let bytes = fitted.as_bytes();
            assert!(
                bytes.len() <= NAME_MAX,
                "{} bytes: {}",
                name.len(),
                bytes.len()
            );
            let text = std::str::from_utf8(bytes).expect("cut on a character boundary");
            assert!(text.ends_with(suffix));
            if name.len() + suffix.len() <= NAME_MAX {
                assert_eq!(
                    text,
                    format!("{name}{suffix}"),
                    "short names stay as they are"
                );
            } else {
                let stem = text.strip_suffix(suffix).unwrap();
                let (prefix, hash) = stem.rsplit_once('~').unwrap();
                assert!(name.starts_with(prefix));
                assert_eq!(hash.len(), HASH_HEX);
            }
        }
        // Long names that differ only at the end keep different stems.
        let a = format!("{}a", "x".repeat(250));
        let b = format!("{}b", "x".repeat(250));
        assert_ne!(stem(a.as_bytes(), 14), stem(b.as_bytes(), 14));
        // A name that is not UTF-8 is shortened as bytes.
        let raw = OsStr::from_bytes(&[0xff; 250]);
        assert!(fit_name(raw, ".lock").len() <= NAME_MAX);
    }

    #[test]
    fn content_disposition() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"attachment; filename=\"report.pdf\"", Some("report.pdf")),
            (b"attachment; filename=report.pdf", Some("report.pdf")),
            (b"inline; FILENAME = \"a b.txt\" ", Some("a b.txt")),
            (b"attachment; filename=\"a;b.txt\"; size=3", Some("a;b.txt")),
            (
                b"attachment; filename=\"say \\\"hi\\\".txt\"",
                Some("say \"hi\".txt"),
            ),
            (
                b"attachment; filename=\"back\\\\slash\"",
                Some("back\\slash"),
            ),
            (
                b"attachment; filename*=UTF-8''caf%C3%A9%20menu.txt",
                Some("café menu.txt"),
            ),
            (
                b"attachment; filename*=utf-8'en'%E2%82%AC.txt",
                Some("€.txt"),
            ),
            (
                b"attachment; filename=\"fallback.txt\"; filename*=UTF-8''real.txt",
                Some("real.txt"),
            ),
            (
                b"attachment; filename*=UTF-8''real.txt; filename=\"fallback.txt\"",
                Some("real.txt"),
            ),
            (
                b"attachment; filename=\"fallback.txt\"; filename*=ISO-8859-1''caf%E9.txt",
                Some("caf\u{e9}.txt"),
            ),
            (
                b"attachment; filename*=iso-8859-1'fr'caf%E9%20cr%E8me.txt",
                Some("caf\u{e9} cr\u{e8}me.txt"),
            ),
            (
                b"attachment; filename=\"fallback.txt\"; filename*=KOI8-R''%C1.txt",
                Some("fallback.txt"),
            ),
            (b"attachment; filename*=KOI8-R''%C1.txt", None),
            (
                b"attachment; filename=\"ok.txt\"; filename*=UTF-8''%FF%FE",
                Some("ok.txt"),
            ),
            (b"attachment; filename*=nonsense", None),
            (b"attachment", None),
            (b"inline", None),
            (b"", None),
            (b"attachment; filename", None),
            (b"attachment; filename=", Some("")),
            (b"attachment; filename=\"\"", Some("")),
            (b"attachment; filename=\"unterminated", None),
            (
                b"attachment; name=\"field\"; filename=\"x.bin\"",
                Some("x.bin"),
            ),
            (
                b"attachment; filename=\"first.txt\"; filename=\"second.txt\"",
                Some("first.txt"),
            ),
            (b"filename=\"no-type.txt\"", Some("no-type.txt")),
            (
                b"attachment; filename=\"caf\xc3\xa9.txt\"",
                Some("café.txt"),
            ),
            (b"attachment; filename=\"caf\xe9.txt\"", Some("café.txt")),
            (
                b"attachment; filename=\"../../etc/passwd\"",
                Some("../../etc/passwd"),
            ),
        ];
        for (header, expected) in cases {
            assert_eq!(
                content_disposition_filename(header).as_deref(),
                *expected,
                "{}",
                String::from_utf8_lossy(header)
            );
        }
    }

    #[test]
    fn server_names_are_bare() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"attachment; filename=\"report.pdf\"", Some("report.pdf")),
            (b"attachment; filename=\"../../etc/passwd\"", Some("passwd")),
            (
                b"attachment; filename*=UTF-8''..%2F..%2Fetc%2Fpasswd",
                Some("passwd"),
            ),
            (
                b"attachment; filename=\"C:\\\\evil\\\\x.exe\"",
                Some("x.exe"),
            ),
            (b"attachment; filename=\"..\"", None),
            (b"attachment; filename=\".\"", None),
            (b"attachment; filename=\"\"", None),
            (b"attachment; filename=\"dir/\"", None),
            (b"attachment; filename=\"-n\"", Some("n")),
            (b"attachment; filename*=UTF-8''a%0Ab%00c", Some("abc")),
            (b"attachment", None),
            (b"garbage", None),
        ];
        for (header, expected) in cases {
            assert_eq!(
                server_name(header).as_deref(),
                *expected,
                "{}",
                String::from_utf8_lossy(header)
            );
        }
    }
}
