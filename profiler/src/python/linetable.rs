//! CPython's three line-number tables: the byte offset of an instruction in
//! a code object's bytecode to its source line.
//!
//! Each decoder is a port of CPython's own `PyCode_Addr2Line` for that
//! format, so it gives what `frame.f_lineno` gives. They read only the
//! bytes they are handed and stop at the table's end, so a corrupt table
//! yields a wrong line or `None`, never a read past it.

/// Which table a code object carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineTableFormat {
    /// 3.8 and 3.9 `co_lnotab`: `(byte delta: u8, line delta: i8)` pairs.
    Lnotab,
    /// 3.10 `co_linetable`: `(byte delta: u8, line delta: i8)` pairs,
    /// `-128` meaning "no line" (PEP 626).
    Linetable310,
    /// 3.11+ `co_linetable`: the location table of `Objects/locations.md`.
    Locations,
}

impl LineTableFormat {
    /// The line of the instruction at byte offset `offset` of the bytecode,
    /// for a code object starting at `firstlineno`. `None` where the
    /// instruction has no line (3.10+) or the table does not cover it.
    pub fn line(self, table: &[u8], firstlineno: u32, offset: u32) -> Option<u32> {
        let line = match self {
            Self::Lnotab => lnotab_line(table, firstlineno.into(), offset.into()),
            Self::Linetable310 => linetable310_line(table, firstlineno.into(), offset.into()),
            Self::Locations => locations_line(table, firstlineno.into(), offset.into()),
        }?;
        u32::try_from(line).ok()
    }
}

/// `PyCode_Addr2Line` of 3.8/3.9: the line of the last entry starting at or
/// before `offset`. An offset past the table gets the last line, as there.
fn lnotab_line(table: &[u8], firstlineno: i64, offset: i64) -> Option<i64> {
    let mut line = firstlineno;
    let mut addr = 0i64;
    for pair in table.chunks_exact(2) {
        addr += i64::from(pair[0]);
        if addr > offset {
            break;
        }
        line += i64::from(pair[1] as i8);
    }
    Some(line)
}

/// 3.10's `_PyCode_CheckLineNumber` walking forward from the start: the
/// range `[start, end)` holding `offset`, with the line accumulated up to
/// it. Entries that do not advance the address only move the line.
fn linetable310_line(table: &[u8], firstlineno: i64, offset: i64) -> Option<i64> {
    if offset < 0 {
        return Some(firstlineno);
    }
    let mut computed = firstlineno;
    let mut end = 0i64;
    for pair in table.chunks_exact(2) {
        let start = end;
        end += i64::from(pair[0]);
        let delta = pair[1] as i8;
        let line = if delta == -128 {
            None
        } else {
            computed += i64::from(delta);
            Some(computed)
        };
        if start <= offset && offset < end {
            return line;
        }
    }
    None
}

/// Location-table entry kinds (`Objects/locations.md`).
const LOCATION_ONE_LINE0: u8 = 10;
const LOCATION_ONE_LINE2: u8 = 12;
const LOCATION_NO_COLUMNS: u8 = 13;
const LOCATION_LONG: u8 = 14;
const LOCATION_NONE: u8 = 15;

/// 3.11+: each entry starts with a byte `1 kkkk lll` (kind `k`, covering
/// `l + 1` code units) followed by its operands (bytes without the high
/// bit). Only the line delta matters here: kinds 0-9 keep the line, 10-12
/// add 0-2, 13 and 14 start with a signed varint delta, 15 has no line and
/// keeps the running line unchanged.
fn locations_line(table: &[u8], firstlineno: i64, offset: i64) -> Option<i64> {
    if offset < 0 {
        return Some(firstlineno);
    }
    let mut line = firstlineno;
    let mut end = 0i64;
    let mut at = 0usize;
    while at < table.len() {
        let first = table[at];
        if first & 0x80 == 0 {
            // Not an entry start: the table is corrupt.
            return None;
        }
        let kind = (first >> 3) & 0x0f;
        let start = end;
        end += (i64::from(first & 7) + 1) * 2;
        let delta = match kind {
            LOCATION_NO_COLUMNS | LOCATION_LONG => signed_varint(&table[at + 1..])?,
            LOCATION_ONE_LINE0..=LOCATION_ONE_LINE2 => i64::from(kind - LOCATION_ONE_LINE0),
            _ => 0,
        };
        line += delta;
        if start <= offset && offset < end {
            return (kind != LOCATION_NONE).then_some(line);
        }
        at += 1;
        while at < table.len() && table[at] & 0x80 == 0 {
            at += 1;
        }
    }
    None
}

/// A varint of 6-bit chunks, least significant first, bit 6 meaning "more".
fn varint(bytes: &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x3f) << (6 * i);
        if byte & 0x40 == 0 {
            return Some(value);
        }
    }
    None
}

/// Zig-zag-ish: the low bit is the sign.
fn signed_varint(bytes: &[u8]) -> Option<i64> {
    let value = varint(bytes)?;
    let magnitude = i64::try_from(value >> 1).ok()?;
    Some(if value & 1 == 1 {
        -magnitude
    } else {
        magnitude
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A golden file written by `testdata/gen_linetables.py` with one
    /// interpreter: a function's table and, for every instruction offset,
    /// the line CPython itself gives it.
    #[derive(serde::Deserialize)]
    struct Golden {
        version: String,
        firstlineno: u32,
        table: String,
        code_bytes: u32,
        lines: Vec<(u32, Option<u32>)>,
    }

    fn load(text: &str) -> (Golden, Vec<u8>) {
        let golden: Golden = serde_json::from_str(text).expect("golden json");
        let table = (0..golden.table.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&golden.table[i..i + 2], 16).expect("hex"))
            .collect();
        (golden, table)
    }

    /// Check that every instruction of the golden function decodes to the
    /// interpreter's own line, the first and the last included.
    fn check(format: LineTableFormat, text: &str) {
        let (golden, table) = load(text);
        assert_eq!(golden.lines.len() as u32, golden.code_bytes / 2);
        assert_eq!(golden.lines.first().map(|l| l.0), Some(0));
        assert_eq!(
            golden.lines.last().map(|l| l.0),
            Some(golden.code_bytes - 2)
        );
        for &(offset, line) in &golden.lines {
            assert_eq!(
                format.line(&table, golden.firstlineno, offset),
                line,
                "python {} offset {offset}",
                golden.version
            );
        }
        // The sample's last statement sits 300 lines below the previous
        // one: a line delta no single entry holds. (From 3.12 the code
        // after it, exception cleanup, has no line.)
        assert!(golden.lines.iter().any(|l| l.1 == Some(1313)));
    }

    #[test]
    fn lnotab_of_3_8_matches_findlinestarts() {
        check(
            LineTableFormat::Lnotab,
            include_str!("testdata/linetable-3.8.json"),
        );
    }

    #[test]
    fn lnotab_of_3_9_matches_findlinestarts() {
        check(
            LineTableFormat::Lnotab,
            include_str!("testdata/linetable-3.9.json"),
        );
    }

    #[test]
    fn linetable_of_3_10_matches_co_lines() {
        check(
            LineTableFormat::Linetable310,
            include_str!("testdata/linetable-3.10.json"),
        );
    }

    #[test]
    fn locations_of_3_11_match_co_lines() {
        check(
            LineTableFormat::Locations,
            include_str!("testdata/linetable-3.11.json"),
        );
    }

    #[test]
    fn locations_of_3_12_match_co_lines() {
        check(
            LineTableFormat::Locations,
            include_str!("testdata/linetable-3.12.json"),
        );
    }

    #[test]
    fn locations_of_3_13_match_co_lines() {
        check(
            LineTableFormat::Locations,
            include_str!("testdata/linetable-3.13.json"),
        );
    }

    #[test]
    fn locations_without_a_line_give_none() {
        let (golden, table) = load(include_str!("testdata/linetable-3.12.json"));
        let (offset, _) = *golden
            .lines
            .iter()
            .find(|l| l.1.is_none())
            .expect("3.12 sample has code without a location");
        assert_eq!(
            LineTableFormat::Locations.line(&table, golden.firstlineno, offset),
            None
        );
    }

    #[test]
    fn offsets_past_the_table_have_no_line_from_3_10() {
        let (golden, table) = load(include_str!("testdata/linetable-3.13.json"));
        assert_eq!(
            LineTableFormat::Locations.line(&table, golden.firstlineno, golden.code_bytes),
            None
        );
        let (golden, table) = load(include_str!("testdata/linetable-3.10.json"));
        assert_eq!(
            LineTableFormat::Linetable310.line(&table, golden.firstlineno, golden.code_bytes),
            None
        );
    }

    #[test]
    fn a_truncated_location_table_gives_none_not_a_panic() {
        let (golden, table) = load(include_str!("testdata/linetable-3.11.json"));
        for cut in 0..table.len() {
            for &(offset, _) in &golden.lines {
                // Any answer is fine; it must not read past the slice.
                let _ = LineTableFormat::Locations.line(&table[..cut], golden.firstlineno, offset);
            }
        }
        // A continuation byte where an entry should start.
        assert_eq!(LineTableFormat::Locations.line(&[0x05], 1, 0), None);
    }

    #[test]
    fn varints_are_six_bit_little_endian_chunks() {
        assert_eq!(varint(&[0x05]), Some(5));
        assert_eq!(varint(&[0x41, 0x02]), Some(1 | (2 << 6)));
        assert_eq!(signed_varint(&[0x07]), Some(-3));
        assert_eq!(signed_varint(&[0x06]), Some(3));
        assert_eq!(varint(&[0x40]), None);
    }
}
