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
    use crate::{
        alert::{Alert, AlertKind, AlertLevel, AlertRequest, AlertSite},
        report::{tests_support::sample_report, *},
    };

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

    /// A report with every part a report can have: each optional field
    /// set, each list that is left out when empty given an entry.
    fn full_report() -> Report {
        let mut report = sample_report();
        report.modules = vec![Module {
            path: "/opt/app/server".into(),
            build_id: Some("5e6b0c2d4f".into()),
        }];
        let memory = crate::process_memory::MemoryFigures {
            rss_bytes: 9 << 20,
            pss_bytes: 8 << 20,
            uss_bytes: 7 << 20,
            shared_bytes: 2 << 20,
            anon_bytes: 6 << 20,
            file_bytes: 3 << 20,
            shmem_bytes: 4096,
            swap_bytes: 0,
            vms_bytes: 200 << 20,
            threads: 2,
            processes: 1,
        };
        let frames = report.sites[0].frames.clone();
        let mut python = Frame::named("handle");
        python.file = Some("/srv/app/app.py".into());
        python.line = Some(41);
        python.language = Language::Python;
        let site = &mut report.sites[0];
        site.frames.push(python);
        site.history = Some(SiteHistory {
            live_bytes: vec![2_048_000, 4_096_000],
            alloc_bytes: vec![2_048_000, 2_048_000],
            surviving_bytes: vec![2_048_000, 2_048_000],
        });
        site.classification = Some(crate::classify::Classification {
            verdict: crate::classify::Verdict::Unknown,
            growth_bytes_per_window: 2_048_000,
            confidence: crate::classify::Confidence::Low,
            reason: "2 windows".into(),
            windows_needed: Some(1),
        });
        let mapped = MappedReport {
            recorded_bytes: 1 << 27,
            mapped_bytes: 1 << 27,
            committed_bytes: 1 << 20,
            reserved_bytes: (1 << 27) - (1 << 20),
            resident_bytes: 1 << 18,
        };
        report.sites.push(Site {
            kind: SiteKind::Mmap,
            frames: vec![Frame::named("reserve_site")],
            live_bytes: 1 << 20,
            live_count: 1,
            alloc_bytes: 1 << 27,
            alloc_count: 1,
            mapped: Some(mapped),
            ..Site::default()
        });
        report.mapped = Totals {
            alloc_count: 1,
            alloc_bytes: 1 << 27,
            live_count: 1,
            live_bytes: 1 << 20,
            ..Totals::default()
        };
        report.mapped_memory = Some(mapped);
        report.loader = Some(Totals {
            alloc_count: 1,
            alloc_bytes: 8192,
            live_count: 1,
            live_bytes: 8192,
            ..Totals::default()
        });
        report.stdio_buffers = Some(Totals {
            alloc_count: 1,
            alloc_bytes: 1024,
            live_count: 1,
            live_bytes: 1024,
            ..Totals::default()
        });
        report.probes = vec![crate::attach::AttachedProbe {
            function: "free".into(),
            library: "/usr/lib/x86_64-linux-gnu/libc.so.6".into(),
            entry_offset: 3,
            emulated: true,
            return_probe: false,
        }];
        report.warnings = vec!["1 child was not followed".into()];
        let target = ProcessReport {
            pid: 4242,
            command: "./server --port 8080".into(),
            totals: report.totals,
            heap: Some(HeapReport {
                first: 0x5555_0000_0000,
                current: 0x5555_0040_0000,
                grown_bytes: 0x40_0000,
                shrunk_bytes: 0,
            }),
            growth_bytes: report.totals.live_bytes as i64,
            sites: report.sites.clone(),
            following: crate::processes::Following::Started,
            python: Some("3.11.2".into()),
            python_objects: Some(PythonObjects::Malloc),
            peak_bytes: Some(4_096_000),
            peak_s: Some(11.0),
            memory: Some(memory),
            arenas: vec![crate::arenas::ArenaHeap {
                kind: crate::arenas::HeapKind::Main,
                address: 0x5555_0000_0000,
                committed_bytes: 0x40_0000,
                resident_bytes: 0x40_0000,
                live_bytes: 4_096_000,
                live_count: 1000,
                free_bytes: 80_304,
            }],
            anon_mappings: vec![crate::address_space::SizeClass {
                min_bytes: 1 << 20,
                count: 1,
                mapped_bytes: 1 << 27,
                committed_bytes: 1 << 20,
                resident_bytes: 1 << 18,
            }],
            teardown_s: Some(12.0),
            ..ProcessReport::default()
        };
        let child = ProcessReport {
            pid: 4243,
            ppid: Some(4242),
            command: "./server --port 8080".into(),
            started_s: 0.5,
            exited_s: Some(3.0),
            inherited_count: 1,
            inherited_bytes: 4096,
            following: crate::processes::Following::Late,
            note: Some("held 62 ms before memscope could probe it".into()),
            ..ProcessReport::default()
        };
        report.processes = vec![target, child];
        report.attach_costs = Some(AttachCosts {
            processes: 2,
            median_ms: 12.5,
            max_ms: 20.0,
        });
        report.tick_costs = Some(TickCosts {
            ticks: 2,
            median_ms: 0.5,
            max_ms: 0.75,
        });
        let window_site = WindowSite {
            kind: SiteKind::Malloc,
            frames: frames.clone(),
            growth_bytes: 2_048_000,
            alloc_bytes: 2_048_000,
            alloc_count: 500,
            free_bytes: 0,
            free_count: 0,
        };
        report.windows = vec![WindowReport {
            index: 0,
            start_s: 0.0,
            end_s: 6.25,
            closed_by: crate::timeline::WindowEnd::Timer,
            alloc_bytes: 2_048_000,
            alloc_count: 500,
            free_bytes: 0,
            free_count: 0,
            growth_bytes: 2_048_000,
            live_bytes: 2_048_000,
            rss_bytes: 9 << 20,
            memory: Some(memory),
            top_sites: vec![window_site],
        }];
        report.peak = Some(PeakReport {
            live_bytes: 4_096_000,
            at_s: 11.0,
            processes: vec![ProcessPeakReport {
                pid: 4242,
                live_bytes: 4_096_000,
                at_s: 11.0,
            }],
            window: Some(0),
            top_sites: vec![report.sites[0].clone()],
        });
        report.alerts = vec![Alert {
            kind: AlertKind::Request,
            level: AlertLevel::Warning,
            at_s: 6.25,
            window: 0,
            value_bytes: 2_048_000,
            threshold_bytes: 1 << 20,
            limit_bytes: Some(1 << 30),
            message: "a request retained 2.0 MB at leak_site".into(),
            top_sites: vec![AlertSite {
                site: "leak_site <- handle_request <- main".into(),
                growth_bytes: 2_048_000,
            }],
            held_back: 1,
            request: Some(AlertRequest {
                pid: 4242,
                tid: 4244,
                start_s: 6.0,
                duration_ms: 3.5,
            }),
        }];
        report.workers = vec![crate::workers::WorkerGroup {
            master: 4242,
            workers: vec![4243, 4245],
            memory: Some(memory),
            added_bytes: 8192,
            repeated_bytes_per_worker: 4096,
            repeated_sites: vec![crate::workers::RepeatedSite {
                kind: SiteKind::Malloc,
                frames: frames.clone(),
                bytes_per_worker: 4096,
            }],
        }];
        report.fragmentation = Some(crate::fragmentation::Fragmentation {
            rss_bytes: 9 << 20,
            anon_bytes: 6 << 20,
            live_heap_bytes: 4_096_000,
            heap_overhead_bytes: 16_000,
            mapped_resident_bytes: 1 << 18,
            python_arena_bytes: 0,
            loader_bytes: 8192,
            retained_free_bytes: 1_920_000,
            ratio: Some(1.5),
            vms_rss_ratio: Some(22.2),
            threads: 2,
            arenas: 1,
            arena_resident_bytes: 0x40_0000,
            arena_free_bytes: 80_304,
            arena_max_saving_bytes: 0,
            verdict: crate::fragmentation::FragmentationVerdict::None,
            reason: "the live heap accounts for the anonymous RSS".into(),
            advice: vec!["nothing to do".into()],
        });
        let figures = crate::requests::Percentiles {
            p50: 4096,
            p95: 8192,
            max: 2_048_000,
        };
        report.requests = Some(crate::requests::RequestsReport {
            function: "handle_request".into(),
            keep_after: 10,
            count: 100,
            kept_count: 90,
            open: 1,
            partial: 0,
            alloc_bytes: Some(figures),
            retained_bytes: Some(figures),
            kept_bytes: Some(figures),
            approximate: true,
            largest: vec![crate::requests::RequestReport {
                pid: 4242,
                tid: 4244,
                start_s: 6.0,
                duration_ms: 3.5,
                alloc_count: 600,
                alloc_bytes: 2_100_000,
                retained_bytes: 2_048_000,
                kept_bytes: Some(2_048_000),
            }],
            sites: vec![report.sites[0].clone()],
        });
        report
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
