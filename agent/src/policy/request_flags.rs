//! The feature flags requests to a service carry (`aviary.dev/flags`), from the annotations of
//! the Service and of the HTTPRoutes attached to a port of it.

use std::{collections::BTreeMap, sync::Arc};

use super::annotations::FlagAnnotations;
use crate::table::flags::{RequestFlag, RequestFlags};

/// The flags of `annotated` (each object's annotations, the HTTPRoutes' first, then the
/// Service's), defined by the FeatureFlag objects of `namespace`: every flag any of them
/// names, once; the targeting key of the first that names one; every context header named.
/// None when none names a flag. The store refuses bad annotations, so any left are skipped.
pub(super) fn request_flags<'a>(
    namespace: &str,
    annotated: impl IntoIterator<Item = Option<&'a BTreeMap<String, String>>>,
) -> Option<Arc<RequestFlags>> {
    let mut flags: Option<RequestFlags> = None;
    for parsed in annotated
        .into_iter()
        .filter_map(|annotations| FlagAnnotations::parse(annotations).ok().flatten())
    {
        let into = flags.get_or_insert_with(|| RequestFlags {
            namespace: namespace.into(),
            flags: Vec::new(),
            targeting_key: None,
            context_headers: Vec::new(),
        });
        for (key, header) in parsed.flags {
            if !into.flags.iter().any(|f| f.header == header) {
                into.flags.push(RequestFlag {
                    key: key.into(),
                    header,
                });
            }
        }
        if into.targeting_key.is_none() {
            into.targeting_key = parsed.targeting_key;
        }
        for header in parsed.context_headers {
            if !into.context_headers.contains(&header) {
                into.context_headers.push(header);
            }
        }
    }
    flags.map(Arc::new)
}

#[cfg(test)]
mod tests {
    use http::HeaderName;

    use super::*;
    use crate::table::KeySource;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_routes_and_the_service_name_flags_together_and_the_first_key_wins() {
        let route = annotations(&[
            ("aviary.dev/flags", "new-checkout, dark-mode"),
            ("aviary.dev/flag-key", "header:x-user-id"),
        ]);
        let service = annotations(&[
            ("aviary.dev/flags", "dark-mode,Beta"),
            ("aviary.dev/flag-key", "cookie:uid"),
            ("aviary.dev/flag-headers", "x-country, user-agent"),
        ]);
        let plain = annotations(&[("aviary.dev/split-key", "header:x-user-id")]);
        let flags = request_flags("shop", [Some(&route), None, Some(&plain), Some(&service)])
            .expect("flags are named");
        assert_eq!(&*flags.namespace, "shop");
        let named: Vec<(&str, &str)> = flags
            .flags
            .iter()
            .map(|f| (&*f.key, f.header.as_str()))
            .collect();
        assert_eq!(
            named,
            [
                ("new-checkout", "x-aviary-flag-new-checkout"),
                ("dark-mode", "x-aviary-flag-dark-mode"),
                ("Beta", "x-aviary-flag-beta"),
            ]
        );
        assert_eq!(
            flags.targeting_key,
            Some(KeySource::Header(HeaderName::from_static("x-user-id")))
        );
        assert_eq!(flags.context_headers, ["x-country", "user-agent"]);
        assert_eq!(request_flags("shop", [Some(&plain), None]), None);
    }

    #[test]
    fn bad_flag_annotations_are_refused_with_why() {
        let refused =
            |pairs: &[(&str, &str)]| FlagAnnotations::parse(Some(&annotations(pairs))).unwrap_err();
        assert!(refused(&[("aviary.dev/flags", "a b")]).contains("cannot name a header"));
        assert!(refused(&[("aviary.dev/flags", "Dark,dark")]).contains("share the header"));
        assert!(refused(&[("aviary.dev/flags", " , ")]).contains("names no flag"));
        assert!(refused(&[("aviary.dev/flag-key", "header:x-user-id")])
            .contains("needs aviary.dev/flags"));
        assert!(refused(&[
            ("aviary.dev/flags", "a"),
            ("aviary.dev/flag-key", "query:u")
        ])
        .contains("header:<name> or cookie:<name>"));
        assert!(refused(&[
            ("aviary.dev/flags", "a"),
            ("aviary.dev/flag-headers", "bad header")
        ])
        .contains("is not a header name"));
    }
}
