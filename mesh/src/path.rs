//! Request-path normalization (RELIABILITY M3). Authorization decides on the path this
//! module returns and the sidecar forwards that same path, so a rule and the application
//! never see two different paths.

#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("the path must start with '/'")]
    NotAbsolute,
    #[error("the path holds an encoded slash or backslash (%2F or %5C)")]
    EncodedSeparator,
    #[error("the path holds a backslash")]
    Backslash,
    #[error("the path holds a fragment ('#')")]
    Fragment,
    #[error("the path holds a control character, a space or an invalid percent-encoding")]
    Invalid,
    #[error("the path holds a ';' path parameter (raw or %3B)")]
    PathParameter,
}

/// The normalized form of a request target's path (its query, if any, is dropped: rules
/// match paths only).
///
/// - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded; other
///   encodings are kept, with their hex digits upper-cased;
/// - `.` and `..` segments are resolved (never above the root);
/// - runs of `/` are merged into one.
///
/// Refused: encoded `/` or `\` (whether the application splits on them cannot be known),
/// a raw `\`, a fragment, control characters and spaces, malformed `%` escapes, and `;`
/// path parameters, raw or encoded: Tomcat, Jetty and Spring strip `;...` from each
/// segment before routing, so `/public/..;/admin` reaches `/admin` there while any
/// matcher that keeps the `;` sees a path under `/public` (M3). Spring Security's strict
/// firewall refuses them by default for the same reason.
pub fn normalize(target: &str) -> Result<String, PathError> {
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    if path.contains('#') {
        return Err(PathError::Fragment);
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if path.contains('\\') {
        return Err(PathError::Backslash);
    }
    let decoded = decode_unreserved(path)?;
    // decode_unreserved upper-cases the escapes it keeps: one spelling to look for.
    if decoded.contains(';') || decoded.contains("%3B") {
        return Err(PathError::PathParameter);
    }
    Ok(resolve_segments(&decoded))
}

fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = path.get(i + 1..i + 3).ok_or(PathError::Invalid)?;
            // Checked first: from_str_radix would also take "+1".
            if !hex.bytes().all(|h| h.is_ascii_hexdigit()) {
                return Err(PathError::Invalid);
            }
            let value = u8::from_str_radix(hex, 16).map_err(|_| PathError::Invalid)?;
            match value {
                b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                v if v.is_ascii_alphanumeric() || b"-._~".contains(&v) => out.push(v as char),
                // Decoding these could change the request's meaning: keep them encoded,
                // in one canonical spelling.
                _ => {
                    out.push('%');
                    out.push_str(&hex.to_ascii_uppercase());
                }
            }
            i += 3;
        } else if b.is_ascii_control() || b == b' ' {
            return Err(PathError::Invalid);
        } else {
            // Multi-byte UTF-8 is passed through whole, but never a control character
            // (C1, U+0080..U+009F: found by fuzzing; HTTP parsers refuse raw non-ASCII,
            // the CLI's --path does not).
            let ch = path[i..].chars().next().expect("in bounds");
            if ch.is_control() {
                return Err(PathError::Invalid);
            }
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    Ok(out)
}

fn resolve_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let trailing_slash = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RELIABILITY M3's corpus: every way of spelling `/admin` either normalizes to
    /// `/admin` (so a rule on `/admin` sees it) or is refused.
    #[test]
    fn spellings_of_admin_normalize_or_are_refused() {
        let to_admin = [
            "/admin",
            "//admin",
            "/a/../admin",
            "/./admin",
            "/%61dmin",
            "/%61%64%6D%69%6E",
            "///admin",
            "/x/y/../../admin",
            "/admin?x=1",
        ];
        for spelling in to_admin {
            assert_eq!(normalize(spelling).as_deref(), Ok("/admin"), "{spelling}");
        }
        let refused = [
            ("/%2Fadmin", PathError::EncodedSeparator),
            ("/%2fadmin", PathError::EncodedSeparator),
            ("\\admin", PathError::NotAbsolute),
            ("/\\admin", PathError::Backslash),
            ("/%5Cadmin", PathError::EncodedSeparator),
            ("/%5cadmin", PathError::EncodedSeparator),
            ("/admin#x", PathError::Fragment),
            ("/adm%in", PathError::Invalid),
            ("/admin%", PathError::Invalid),
            ("/ad min", PathError::Invalid),
            ("/ad\tmin", PathError::Invalid),
            ("admin", PathError::NotAbsolute),
            ("/admin;x", PathError::PathParameter),
            ("/public/..;/admin", PathError::PathParameter),
            ("/public/..%3b/admin", PathError::PathParameter),
            ("/public/..%3B/admin", PathError::PathParameter),
            ("/public;jsessionid=1/../admin", PathError::PathParameter),
        ];
        for (spelling, error) in refused {
            assert_eq!(normalize(spelling), Err(error), "{spelling}");
        }
    }

    #[test]
    fn what_normalization_keeps() {
        // Case is meaningful in paths.
        assert_eq!(normalize("/ADMIN").unwrap(), "/ADMIN");
        assert_eq!(normalize("/a/b/").unwrap(), "/a/b/");
        assert_eq!(normalize("/a/b/..").unwrap(), "/a/");
        assert_eq!(normalize("/..").unwrap(), "/");
        assert_eq!(normalize("/../../etc").unwrap(), "/etc");
        assert_eq!(normalize("/caf%c3%a9").unwrap(), "/caf%C3%A9");
        assert_eq!(normalize("/café").unwrap(), "/café");
        assert_eq!(normalize("/").unwrap(), "/");
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for p in ["//a/./b/../c%7e", "/x%20y/", "/a.b/../c", "/%41%42"] {
            let once = normalize(p).unwrap();
            assert_eq!(normalize(&once).unwrap(), once, "{p}");
        }
    }
}
