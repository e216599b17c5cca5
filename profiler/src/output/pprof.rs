//! profile.pb.gz: the report's sites as a gzipped pprof `Profile`, for
//! `go tool pprof`, Grafana Pyroscope and Parca. The four sample types of
//! Go's heap profiles (alloc_objects, alloc_space, inuse_objects,
//! inuse_space); one location per frame, with its function, file and line;
//! one mapping per module. A pure function of the report, so `memscope
//! report` renders the same file again.
//!
//! The messages are profile.proto's (github.com/google/pprof, its field
//! numbers), written out for prost's derive: no protoc at build time.

use std::collections::HashMap;

use prost::Message as _;

use super::OutputError;
use crate::report::{Frame, Module, Report, Site};

#[derive(Clone, PartialEq, prost::Message)]
pub struct Profile {
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    pub period: i64,
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct ValueType {
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Mapping {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "5")]
    pub filename: i64,
    #[prost(int64, tag = "6")]
    pub build_id: i64,
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
    #[prost(bool, tag = "8")]
    pub has_filenames: bool,
    #[prost(bool, tag = "9")]
    pub has_line_numbers: bool,
    #[prost(bool, tag = "10")]
    pub has_inline_frames: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Location {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    #[prost(int64, tag = "2")]
    pub line: i64,
}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Function {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub name: i64,
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    #[prost(int64, tag = "4")]
    pub filename: i64,
}

/// Builds the profile's tables, each entry once.
#[derive(Default)]
struct Builder {
    profile: Profile,
    strings: HashMap<String, i64>,
    functions: HashMap<(i64, i64), u64>,
    locations: HashMap<(u64, i64, u64), u64>,
    mappings: HashMap<i64, u64>,
    /// Build ids by module path, from the report.
    build_ids: HashMap<String, String>,
}

impl Builder {
    fn string(&mut self, text: &str) -> i64 {
        if let Some(&index) = self.strings.get(text) {
            return index;
        }
        let index = self.profile.string_table.len() as i64;
        self.profile.string_table.push(text.to_owned());
        self.strings.insert(text.to_owned(), index);
        index
    }

    fn value_type(&mut self, kind: &str, unit: &str) -> ValueType {
        ValueType {
            r#type: self.string(kind),
            unit: self.string(unit),
        }
    }

    fn mapping(&mut self, module: &str) -> u64 {
        let filename = self.string(module);
        if let Some(&id) = self.mappings.get(&filename) {
            return id;
        }
        let id = self.profile.mapping.len() as u64 + 1;
        let build_id = match self.build_ids.get(module).cloned() {
            Some(build_id) => self.string(&build_id),
            None => 0,
        };
        self.profile.mapping.push(Mapping {
            id,
            filename,
            build_id,
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
        });
        self.mappings.insert(filename, id);
        id
    }

    /// A frame's location: its function (name and file), line and module.
    fn location(&mut self, frame: &Frame) -> u64 {
        let name = self.string(&frame.function);
        let filename = self.string(frame.file.as_deref().unwrap_or(""));
        let function = match self.functions.get(&(name, filename)) {
            Some(&id) => id,
            None => {
                let id = self.profile.function.len() as u64 + 1;
                self.profile.function.push(Function {
                    id,
                    name,
                    system_name: name,
                    filename,
                });
                self.functions.insert((name, filename), id);
                id
            }
        };
        let line = i64::from(frame.line.unwrap_or(0));
        let mapping = frame.module.as_deref().map_or(0, |m| self.mapping(m));
        let key = (function, line, mapping);
        if let Some(&id) = self.locations.get(&key) {
            return id;
        }
        let id = self.profile.location.len() as u64 + 1;
        self.profile.location.push(Location {
            id,
            mapping_id: mapping,
            line: vec![Line {
                function_id: function,
                line,
            }],
        });
        self.locations.insert(key, id);
        id
    }
}

/// The report as a pprof profile.
pub fn profile(report: &Report) -> Profile {
    profile_of(&Span::of(report), &report.sites, &report.modules)
}

/// What a profile covers, besides its sites.
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    /// memscope's version, the target's pid and command.
    pub comment: String,
    /// When it began, Unix nanoseconds (0: not said).
    pub time_nanos: i64,
    pub duration_s: f64,
}

impl Span {
    pub fn of(report: &Report) -> Self {
        Self {
            comment: format!(
                "memscope {}: pid {} ({})",
                report.memscope_version, report.target.pid, report.target.command
            ),
            time_nanos: 0,
            duration_s: report.duration_s,
        }
    }
}

/// `sites` as a pprof profile: allocations and what is in use.
pub fn profile_of(span: &Span, sites: &[Site], modules: &[Module]) -> Profile {
    let mut b = Builder {
        build_ids: modules
            .iter()
            .filter_map(|m| Some((m.path.clone(), m.build_id.clone()?)))
            .collect(),
        ..Builder::default()
    };
    b.string("");
    let sample_type = vec![
        b.value_type("alloc_objects", "count"),
        b.value_type("alloc_space", "bytes"),
        b.value_type("inuse_objects", "count"),
        b.value_type("inuse_space", "bytes"),
    ];
    b.profile.default_sample_type = sample_type[3].r#type;
    b.profile.sample_type = sample_type;
    b.profile.period_type = Some(b.value_type("space", "bytes"));
    b.profile.period = 1;
    b.profile.time_nanos = span.time_nanos;
    b.profile.duration_nanos = (span.duration_s * 1e9) as i64;
    b.profile.comment = vec![b.string(&span.comment)];
    for site in sites {
        let location_id = site.frames.iter().map(|f| b.location(f)).collect();
        let value = [
            site.alloc_count,
            site.alloc_bytes,
            site.live_count,
            site.live_bytes,
        ]
        .map(|v| i64::try_from(v).unwrap_or(i64::MAX))
        .to_vec();
        b.profile.sample.push(Sample { location_id, value });
    }
    b.profile
}

/// profile.pb.gz's bytes.
pub fn render(report: &Report) -> Result<Vec<u8>, OutputError> {
    gzipped(&profile(report))
}

/// A profile encoded and gzipped, as pprof files are.
pub fn gzipped(profile: &Profile) -> Result<Vec<u8>, OutputError> {
    use std::io::Write as _;
    let bytes = profile.encode_to_vec();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&bytes)
        .and_then(|()| gz.finish())
        .map_err(|e| OutputError::Render {
            what: super::PROFILE_PB_GZ,
            message: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests_support;

    #[test]
    fn profile_matches_golden_file() {
        let bytes = render(&tests_support::sample_report()).expect("renders");
        crate::output::assert_golden("profile.pb.gz", &bytes);
    }

    #[test]
    fn sites_become_samples_with_the_four_heap_values() {
        let report = tests_support::sample_report();
        let profile = profile(&report);
        let name = |i: i64| profile.string_table[i as usize].as_str();
        let types: Vec<&str> = profile.sample_type.iter().map(|t| name(t.r#type)).collect();
        assert_eq!(
            types,
            [
                "alloc_objects",
                "alloc_space",
                "inuse_objects",
                "inuse_space"
            ]
        );
        assert_eq!(profile.string_table[0], "");
        assert_eq!(profile.sample.len(), report.sites.len());
        let first = &report.sites[0];
        let sample = &profile.sample[0];
        assert_eq!(
            sample.value,
            [
                first.alloc_count,
                first.alloc_bytes,
                first.live_count,
                first.live_bytes
            ]
            .map(|v| v as i64)
        );
        // The leaf first, as pprof wants it.
        let leaf = &profile.location[sample.location_id[0] as usize - 1];
        let function = &profile.function[leaf.line[0].function_id as usize - 1];
        assert_eq!(name(function.name), first.frames[0].function);
        // Gzipped, and decodes back.
        let bytes = render(&report).expect("renders");
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut text)
            .expect("gunzips");
        assert_eq!(Profile::decode(&text[..]).expect("decodes"), profile);
    }

    #[test]
    fn mappings_carry_the_modules_build_ids() {
        let mut report = tests_support::sample_report();
        report.modules = vec![crate::report::Module {
            path: "/opt/app/server".into(),
            build_id: Some("0123abcd".into()),
        }];
        let profile = profile(&report);
        let mapping = profile
            .mapping
            .iter()
            .find(|m| profile.string_table[m.filename as usize] == "/opt/app/server")
            .expect("the server's mapping");
        assert_eq!(profile.string_table[mapping.build_id as usize], "0123abcd");
    }
}
