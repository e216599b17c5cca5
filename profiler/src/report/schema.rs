//! docs/report.schema.json: the JSON Schema (draft 2020-12) of report.json,
//! generated from the report types by schemars, so it follows them. A unit
//! test keeps the committed file equal to `json_schema_text()`, and the
//! end-to-end tests validate every report.json they read against it.

use schemars::{
    Schema, SchemaGenerator,
    generate::SchemaSettings,
    json_schema,
    transform::{RecursiveTransform, Transform as _},
};
use serde_json::Value;

use super::{Report, SCHEMA};

/// Where the committed schema lives, from the workspace root.
pub const SCHEMA_FILE: &str = "docs/report.schema.json";

/// The schema of report.json as memscope writes it: a field is required
/// unless it is left out when it has no value (the ones marked optional in
/// docs/report-schema.md), and an absent field is never written as `null`.
pub fn json_schema() -> Value {
    let mut schema = SchemaSettings::draft2020_12()
        // What memscope writes: a field with a default is written all the same.
        .for_serialize()
        .into_generator()
        .into_root_schema_for::<Report>();
    RecursiveTransform(absent_is_not_null).transform(&mut schema);
    schema.to_value()
}

/// `json_schema()` pretty-printed, with a final newline: the text of
/// docs/report.schema.json.
pub fn json_schema_text() -> String {
    // NB: serde_json's maps are sorted (memscope does not enable its
    // `preserve_order`), so the keys come out in the same order every time.
    format!("{:#}\n", json_schema())
}

/// `Report::schema`: the version, one value only.
pub(super) fn schema_version(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "string", "const": SCHEMA })
}

/// schemars lets every `Option` be `null`; memscope leaves an empty
/// optional field out instead (`skip_serializing_if`), so a property that
/// is not required takes its value's schema without `null`.
fn absent_is_not_null(schema: &mut Schema) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    let required: Vec<String> = object
        .get("required")
        .and_then(Value::as_array)
        .map(|r| {
            r.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let Some(properties) = object.get_mut("properties").and_then(Value::as_object_mut) else {
        return;
    };
    for (name, property) in properties.iter_mut() {
        if !required.contains(name)
            && let Some(property) = property.as_object_mut()
        {
            drop_null(property);
        }
    }
}

/// Takes `null` out of one property's schema, in the two shapes schemars
/// gives it: `"type": [T, "null"]` and `"anyOf": [{...}, {"type": "null"}]`.
fn drop_null(property: &mut serde_json::Map<String, Value>) {
    if let Some(Value::Array(types)) = property.get_mut("type") {
        types.retain(|t| t != "null");
        if let [only] = types.as_slice() {
            let only = only.clone();
            property.insert("type".into(), only);
        }
    }
    if let Some(Value::Array(any_of)) = property.get_mut("anyOf") {
        any_of.retain(|s| s.get("type").and_then(Value::as_str) != Some("null"));
        if let [Value::Object(only)] = any_of.as_slice() {
            let only = only.clone();
            property.remove("anyOf");
            property.extend(only);
        }
    }
    if property.get("default").is_some_and(Value::is_null) {
        property.remove("default");
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, path::Path};

    use super::*;
    use crate::report::tests_support::full_report;

    fn committed_path() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(SCHEMA_FILE)
    }

    /// Check that docs/report.schema.json is what the report types generate
    /// (`MEMSCOPE_BLESS=1` rewrites it, as it does the golden files).
    #[test]
    fn committed_schema_matches_the_report_types() {
        let generated = json_schema_text();
        let path = committed_path();
        if std::env::var_os("MEMSCOPE_BLESS").is_some() {
            std::fs::write(&path, &generated).expect("bless docs/report.schema.json");
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{SCHEMA_FILE} differs from the schema the report types generate; if the change \
             is intended, regenerate it: MEMSCOPE_BLESS=1 cargo test -p memscope --lib \
             report::schema"
        );
    }

    fn validator() -> jsonschema::Validator {
        let schema: Value = serde_json::from_str(
            &std::fs::read_to_string(committed_path()).expect("docs/report.schema.json"),
        )
        .expect("docs/report.schema.json parses");
        jsonschema::draft202012::new(&schema).expect("docs/report.schema.json is a JSON Schema")
    }

    /// The validator's messages for `report`, each with the instance path.
    fn errors(report: &Value) -> Vec<String> {
        validator()
            .iter_errors(report)
            .map(|e| format!("{}: {e}", e.instance_path().as_str()))
            .collect()
    }

    /// The properties `instance` sets, as `(definition, property)`, found
    /// by walking it along `schema` (`root` resolves the `$ref`s).
    fn properties_set(
        root: &Value,
        schema: &Value,
        instance: &Value,
        at: &str,
        seen: &mut BTreeSet<(String, String)>,
    ) {
        if let Some(name) = schema
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/$defs/"))
        {
            return properties_set(root, &root["$defs"][name], instance, name, seen);
        }
        match instance {
            Value::Object(fields) => {
                for (key, value) in fields {
                    seen.insert((at.to_owned(), key.clone()));
                    properties_set(root, &schema["properties"][key], value, at, seen);
                }
            }
            Value::Array(items) => {
                for item in items {
                    properties_set(root, &schema["items"], item, at, seen);
                }
            }
            _ => {}
        }
    }

    /// Every property the schema declares, as `(definition, property)`.
    fn properties_declared(root: &Value) -> BTreeSet<(String, String)> {
        let defs = root["$defs"].as_object().into_iter().flatten();
        std::iter::once(("Report", root))
            .chain(defs.map(|(name, def)| (name.as_str(), def)))
            .flat_map(|(name, def)| {
                def["properties"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(move |(key, _)| (name.to_owned(), key.clone()))
            })
            .collect()
    }

    /// Check that a report with every part filled in matches the schema,
    /// and sets every property the schema declares (so the check covers
    /// the whole schema, windows, requests and fragmentation included).
    #[test]
    fn a_report_with_every_part_matches_the_schema() {
        let report = serde_json::to_value(full_report()).expect("serialize");
        assert_eq!(errors(&report), Vec::<String>::new());

        let schema = json_schema();
        let mut seen = BTreeSet::new();
        properties_set(&schema, &schema, &report, "Report", &mut seen);
        let unset: Vec<_> = properties_declared(&schema)
            .difference(&seen)
            .cloned()
            .collect();
        assert_eq!(unset, Vec::new(), "properties full_report() leaves out");
    }

    /// Check that the schema rejects what memscope never writes: `null` for
    /// an absent field, a missing required field, an unknown kind, a
    /// negative count, another version; each error names where it is.
    #[test]
    fn the_schema_rejects_what_memscope_never_writes() {
        let report = serde_json::to_value(full_report()).expect("serialize");
        let broken = |path: &str, value: Option<Value>| {
            let mut report = report.clone();
            let (parent, key) = path.rsplit_once('/').expect("a path");
            let parent = report.pointer_mut(parent).expect("the parent exists");
            match value {
                Some(value) => parent[key] = value,
                None => {
                    parent.as_object_mut().expect("an object").remove(key);
                }
            }
            errors(&report)
        };
        let cases: [(&str, Option<Value>, &str); 6] = [
            (
                "/target/exit_code",
                Some(Value::Null),
                "/target/exit_code: null is not of type \"integer\"",
            ),
            (
                "/sites/0/frames",
                None,
                "/sites/0: \"frames\" is a required property",
            ),
            (
                "/sites/1/kind",
                Some("brk".into()),
                "/sites/1/kind: \"brk\" is not valid under any of the schemas listed in the \
                 'oneOf' keyword",
            ),
            (
                "/requests/count",
                Some((-1).into()),
                "/requests/count: -1 is less than the minimum of 0",
            ),
            (
                "/schema",
                Some("memscope.report/2".into()),
                "/schema: \"memscope.report/1\" was expected",
            ),
            (
                "/fragmentation/verdict",
                Some("leak".into()),
                "/fragmentation/verdict: \"leak\" is not valid under any of the schemas listed \
                 in the 'oneOf' keyword",
            ),
        ];
        let (got, expected): (Vec<_>, Vec<_>) = cases
            .into_iter()
            .map(|(path, value, expected)| (broken(path, value), vec![expected.to_owned()]))
            .unzip();
        assert_eq!(got, expected);
    }
}
