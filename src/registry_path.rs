//! Paths of the OCI Distribution pull API: `/v2/NAME/{manifests,blobs}/REFERENCE`.

/// What a `/v2/NAME/{manifests,blobs}/REFERENCE` path asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum RegistryPath<'a> {
    Manifest { name: &'a str, reference: &'a str },
    Blob { name: &'a str, reference: &'a str },
}

/// Parses a registry API path (`/v2/` excluded). `None` for anything else.
pub fn parse_registry_path(path: &str) -> Option<RegistryPath<'_>> {
    let rest = path.strip_prefix("/v2/")?;
    let (head, reference) = rest.rsplit_once('/')?;
    let (name, kind) = head.rsplit_once('/')?;
    if name.is_empty() || reference.is_empty() || !valid_name(name) {
        return None;
    }
    match kind {
        "manifests" => Some(RegistryPath::Manifest { name, reference }),
        "blobs" => Some(RegistryPath::Blob { name, reference }),
        _ => None,
    }
}

/// Repository names as the distribution spec allows: lowercase path components of
/// `[a-z0-9._-]`, no empty, `.` or `..` component.
fn valid_name(name: &str) -> bool {
    name.split('/').all(|c| {
        !c.is_empty()
            && c != "."
            && c != ".."
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    })
}

/// The media types named by `Accept` header values (parameters and `*/*` dropped).
pub fn accepted_media_types<'a>(values: impl Iterator<Item = &'a str>) -> Vec<String> {
    values
        .flat_map(|v| v.split(','))
        .map(|s| s.split(';').next().unwrap_or(s).trim().to_string())
        .filter(|s| !s.is_empty() && s != "*/*")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_values() {
        let v = ["application/a+json; q=0.5, */*", "application/b"];
        assert_eq!(
            accepted_media_types(v.into_iter()),
            ["application/a+json", "application/b"]
        );
    }

    #[test]
    fn parses_nested_names() {
        assert_eq!(
            parse_registry_path("/v2/local/library/alpine/manifests/3.19"),
            Some(RegistryPath::Manifest {
                name: "local/library/alpine",
                reference: "3.19"
            })
        );
        assert_eq!(
            parse_registry_path("/v2/a/blobs/sha256:00"),
            Some(RegistryPath::Blob {
                name: "a",
                reference: "sha256:00"
            })
        );
        assert_eq!(parse_registry_path("/v2/a/tags/list"), None);
        assert_eq!(parse_registry_path("/v2/../x/blobs/y"), None);
        assert_eq!(parse_registry_path("/v2/UP/blobs/y"), None);
    }
}
