//! One object's unwind rules as the kernel's unwinder reads them: every row
//! of every FDE of its `.eh_frame` (or `.debug_frame` when it has none),
//! reduced to the few rules a BPF program can follow (CFA on rsp or rbp,
//! the PLT's expression, the outermost frame) and flattened into one table
//! sorted by pc, so the kernel side needs only a binary search.
//!
//! Anything else DWARF can say (other registers, expressions, a return
//! address not at CFA-8) becomes a STOP row: the walk cuts the stack there
//! instead of following a rule it would get wrong.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, CommonInformationEntry, DebugFrame, EhFrame, EndianSlice,
    LittleEndian, Register, RegisterRule, UnwindContext, UnwindOffset, UnwindSection,
    UnwindTableRow,
};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};
use profiler_common::{UnwindRow, cfa_rule};

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("not an ELF64 object: {0}")]
    NotElf(#[source] object::Error),
    #[error("not an x86-64 object ({0:?})")]
    NotX86_64(object::Architecture),
    #[error("no .eh_frame or .debug_frame section")]
    NoUnwindSection,
    #[error("cannot read {section}: {source}")]
    Section {
        section: &'static str,
        #[source]
        source: object::Error,
    },
    #[error("malformed CFI in {section}: {source}")]
    Cfi {
        section: &'static str,
        #[source]
        source: gimli::Error,
    },
    /// Rows hold u32 pcs (8 bytes a row in the kernel's map); an object
    /// linked above 4 GiB cannot be described.
    #[error("all {fdes} FDEs end past the 4 GiB a u32 pc can hold")]
    AddressPastU32 { fdes: usize },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One object's rows and what is needed to place them in a process.
pub struct ObjectTable {
    /// Sorted by pc, strictly increasing: each holds up to the next.
    pub rows: Vec<UnwindRow>,
    /// FDEs read, including any skipped (empty, past u32, unreadable).
    pub fdes: usize,
    /// Share of FDEs covering at least 16 bytes whose CFA is on rbp at
    /// some row: near 1.0 for an object built with frame pointers, which
    /// the kernel's frame-pointer walk handles as well.
    pub frame_pointer_share: f32,
    /// PT_LOAD segments: (p_offset, p_vaddr, p_filesz).
    segments: Vec<(u64, u64, u64)>,
}

/// x86-64 DWARF register numbers.
const RBP: Register = Register(6);
const RSP: Register = Register(7);
const RA: Register = Register(16);

/// The CFA expression linkers emit for a lazy .plt, whose 16-byte entries
/// have pushed the relocation index from byte N on: `DW_OP_breg7 8;
/// DW_OP_breg16 0; DW_OP_lit15; DW_OP_and; DW_OP_litN; DW_OP_ge;
/// DW_OP_lit3; DW_OP_shl; DW_OP_plus`, with `DW_OP_litN` at `PLT_N_AT`.
const PLT_EXPRESSION: [u8; 11] = [
    0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, 0x30, 0x2a, 0x33, 0x24, 0x22,
];
const PLT_N_AT: usize = 6;
const DW_OP_LIT0: u8 = 0x30;

/// Pages as the kernel maps an ELF's segments (x86-64).
const PAGE: u64 = 4096;

impl ObjectTable {
    /// Reads the file and builds its table.
    pub fn read(path: &Path) -> Result<Self, TableError> {
        let data = std::fs::read(path).map_err(|source| TableError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::build(&data)
    }

    /// Builds the table of an x86-64 ELF object's bytes.
    ///
    /// FDEs past 4 GiB are left out (the u32 pcs cannot hold them), and
    /// one gimli cannot evaluate is a single STOP row: one odd function
    /// need not cost the whole object. It is an error only when the section
    /// itself cannot be read or every FDE is past 4 GiB.
    pub fn build(data: &[u8]) -> Result<Self, TableError> {
        build_with_stats(data).map(|(table, _)| table)
    }

    /// Runtime address minus link-time address for a mapping of this object
    /// at `start` whose file offset is `file_offset` (/proc/PID/maps).
    /// None when no PT_LOAD segment holds that offset.
    pub fn bias(&self, start: u64, file_offset: u64) -> Option<u64> {
        // NB: the kernel maps a segment from its page-rounded offset, so a
        // mapping's offset may lie before its segment's p_offset (and inside
        // the previous segment's last page): a segment starting on that
        // page is the one mapped there.
        let starting_here = self
            .segments
            .iter()
            .find(|&&(offset, _, size)| size > 0 && offset & !(PAGE - 1) == file_offset);
        let holding = || {
            self.segments
                .iter()
                .find(|&&(offset, _, size)| file_offset >= offset && file_offset - offset < size)
        };
        let &(offset, vaddr, _) = starting_here.or_else(holding)?;
        let link = vaddr.wrapping_add(file_offset.wrapping_sub(offset));
        Some(start.wrapping_sub(link))
    }

    /// The row in force at link-time address `pc`; None before the first.
    pub fn lookup(&self, pc: u64) -> Option<UnwindRow> {
        let after = self.rows.partition_point(|row| u64::from(row.pc) <= pc);
        after.checked_sub(1).map(|at| self.rows[at])
    }
}

/// What the conversion met that it could not follow, row by row: for the
/// log, and for the tests to report.
#[derive(Clone, Debug, Default)]
struct Stats {
    /// FDEs with no bytes.
    empty_fdes: usize,
    /// FDEs ending past u32.
    past_u32: usize,
    /// FDEs whose program gimli could not evaluate: their range is STOP.
    failed_fdes: usize,
    /// FDEs whose CIE names a return address register other than 16.
    other_ra_column: usize,
    /// Rows by why they became STOP.
    cfa_expressions: usize,
    cfa_registers: usize,
    /// CFA offsets past u16 (or negative): frames of 64 KiB and more.
    cfa_offsets: usize,
    ra_rules: usize,
    rbp_rules: usize,
    /// PLT rows.
    plt_rows: usize,
}

fn build_with_stats(data: &[u8]) -> Result<(ObjectTable, Stats), TableError> {
    let file = object::read::elf::ElfFile64::<object::Endianness>::parse(data)
        .map_err(TableError::NotElf)?;
    let arch = file.architecture();
    if arch != object::Architecture::X86_64 {
        return Err(TableError::NotX86_64(arch));
    }
    let segments = file
        .segments()
        .map(|segment| {
            let (offset, size) = segment.file_range();
            (offset, segment.address(), size)
        })
        .collect();
    let address = |name: &str| file.section_by_name(name).map(|s| s.address());
    let mut bases = BaseAddresses::default();
    if let Some(text) = address(".text") {
        bases = bases.set_text(text);
    }
    if let Some(got) = address(".got") {
        bases = bases.set_got(got);
    }

    let mut stats = Stats::default();
    // NB: an .eh_frame of no bytes (NOBITS in a separate debug file) is
    // as good as none.
    let eh_frame = file
        .section_by_name(".eh_frame")
        .map(|section| {
            let data = section.data().map_err(|source| TableError::Section {
                section: ".eh_frame",
                source,
            })?;
            Ok::<_, TableError>((section.address(), data))
        })
        .transpose()?
        .filter(|(_, data)| !data.is_empty());
    let rows = if let Some((address, data)) = eh_frame {
        let bases = bases.set_eh_frame(address);
        let section = EhFrame::new(data, LittleEndian);
        let mut rows = Rows::with_capacity(data.len());
        read_section(&section, &bases, ".eh_frame", &mut rows, &mut stats)?;
        rows
    } else {
        let section = file
            .section_by_name(".debug_frame")
            .ok_or(TableError::NoUnwindSection)?;
        let data = section
            .uncompressed_data()
            .map_err(|source| TableError::Section {
                section: ".debug_frame",
                source,
            })?;
        if data.is_empty() {
            return Err(TableError::NoUnwindSection);
        }
        let mut section = DebugFrame::new(&data, LittleEndian);
        section.set_address_size(8);
        let mut rows = Rows::with_capacity(data.len());
        read_section(&section, &bases, ".debug_frame", &mut rows, &mut stats)?;
        rows
    };

    let fdes = rows.fdes;
    if fdes > 0 && stats.past_u32 + stats.empty_fdes == fdes && stats.past_u32 > 0 {
        return Err(TableError::AddressPastU32 { fdes });
    }
    if stats.past_u32 + stats.failed_fdes + stats.other_ra_column > 0 {
        tracing::debug!(?stats, "unwind rows skipped");
    }
    let frame_pointer_share = rows.frame_pointer_share();
    let table = ObjectTable {
        rows: rows.finish(),
        fdes,
        frame_pointer_share,
        segments,
    };
    Ok((table, stats))
}

type Slice<'a> = EndianSlice<'a, LittleEndian>;

/// Every FDE of one section into `rows`.
fn read_section<'a, S>(
    section: &S,
    bases: &BaseAddresses,
    name: &'static str,
    rows: &mut Rows,
    stats: &mut Stats,
) -> Result<(), TableError>
where
    S: UnwindSection<Slice<'a>>,
{
    let cfi = |source| TableError::Cfi {
        section: name,
        source,
    };
    let mut ctx = UnwindContext::new();
    // FDEs share a handful of CIEs: parse each once.
    let mut cies: HashMap<usize, CommonInformationEntry<Slice<'a>>> = HashMap::new();
    let mut entries = section.entries(bases);
    while let Some(entry) = entries.next().map_err(cfi)? {
        let partial = match entry {
            CieOrFde::Cie(cie) => {
                cies.insert(cie.offset(), cie);
                continue;
            }
            CieOrFde::Fde(partial) => partial,
        };
        let fde = partial
            .parse(|section, bases, offset| {
                let key = UnwindOffset::into(offset);
                if let Some(cie) = cies.get(&key) {
                    return Ok(cie.clone());
                }
                let cie = section.cie_from_offset(bases, offset)?;
                cies.insert(key, cie.clone());
                Ok(cie)
            })
            .map_err(cfi)?;
        rows.fdes += 1;
        let start = fde.initial_address();
        let Some(end) = start.checked_add(fde.len()).filter(|&end| end > start) else {
            stats.empty_fdes += 1;
            continue;
        };
        if end > u64::from(u32::MAX) {
            stats.past_u32 += 1;
            continue;
        }
        rows.begin(start, end);
        if fde.cie().return_address_register() != RA {
            stats.other_ra_column += 1;
            rows.abandon();
            continue;
        }
        let Ok(mut table) = fde.rows(section, bases, &mut ctx) else {
            stats.failed_fdes += 1;
            rows.abandon();
            continue;
        };
        loop {
            match table.next_row() {
                Ok(Some(row)) => {
                    let rule = gimli_rule(row, section, stats);
                    rows.row(row.start_address(), row.end_address(), rule);
                }
                Ok(None) => {
                    rows.end();
                    break;
                }
                Err(_) => {
                    stats.failed_fdes += 1;
                    rows.abandon();
                    break;
                }
            }
        }
    }
    Ok(())
}

/// A gimli row in the terms of [`rule`].
fn gimli_rule<'a, S>(row: &UnwindTableRow<usize>, section: &S, stats: &mut Stats) -> Rule
where
    S: UnwindSection<Slice<'a>>,
{
    let cfa = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => Cfa::Register(register.0, *offset),
        CfaRule::Expression(expression) => match expression.get(section) {
            Ok(expression) => Cfa::Expression(expression.0.slice()),
            Err(_) => Cfa::Expression(&[]),
        },
    };
    let saved = |register| match row.register(register) {
        None => Saved::Default,
        Some(RegisterRule::Undefined) => Saved::Undefined,
        Some(RegisterRule::SameValue) => Saved::SameValue,
        Some(RegisterRule::Offset(offset)) => Saved::Offset(offset),
        Some(_) => Saved::Other,
    };
    let (rule, why) = rule(&cfa, saved(RA), saved(RBP));
    match why {
        Why::Followed => {}
        Why::Plt => stats.plt_rows += 1,
        Why::CfaExpression => stats.cfa_expressions += 1,
        Why::CfaRegister => stats.cfa_registers += 1,
        Why::CfaOffset => stats.cfa_offsets += 1,
        Why::ReturnAddress => stats.ra_rules += 1,
        Why::Rbp => stats.rbp_rules += 1,
    }
    rule
}

/// How a row finds the CFA, gimli aside.
#[derive(Clone, Copy, Debug)]
enum Cfa<'a> {
    Register(u16, i64),
    Expression(&'a [u8]),
}

/// A register's rule, gimli aside.
#[derive(Clone, Copy, Debug)]
enum Saved {
    /// No rule given (the ABI's default).
    Default,
    Undefined,
    SameValue,
    Offset(i64),
    Other,
}

/// Which way [`rule`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    Followed,
    Plt,
    CfaExpression,
    CfaRegister,
    CfaOffset,
    ReturnAddress,
    Rbp,
}

/// A row's rule, without its pc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rule {
    cfa_rule: u8,
    cfa_offset: u16,
    rbp_offset: i8,
}

impl Rule {
    const STOP: Self = Self::only(cfa_rule::STOP);
    const END: Self = Self::only(cfa_rule::END);

    const fn only(cfa_rule: u8) -> Self {
        Self {
            cfa_rule,
            cfa_offset: 0,
            rbp_offset: 0,
        }
    }
}

/// The rule a row's CFA, return address and rbp rules come to.
fn rule(cfa: &Cfa<'_>, ra: Saved, rbp: Saved) -> (Rule, Why) {
    match ra {
        // The outermost frame: there is no caller, whatever the CFA.
        Saved::Undefined => return (Rule::END, Why::Followed),
        // NB: x86-64 CIEs put the return address at CFA-8 in their
        // initial instructions, so no rule at all means the same.
        Saved::Offset(-8) | Saved::Default => {}
        _ => return (Rule::STOP, Why::ReturnAddress),
    }
    let (cfa_rule, cfa_offset, why) = match *cfa {
        Cfa::Register(register, offset) => {
            let rule = match Register(register) {
                RSP => cfa_rule::RSP,
                RBP => cfa_rule::RBP,
                _ => return (Rule::STOP, Why::CfaRegister),
            };
            match u16::try_from(offset) {
                Ok(offset) => (rule, offset, Why::Followed),
                Err(_) => return (Rule::STOP, Why::CfaOffset),
            }
        }
        Cfa::Expression(bytes) => match plt_threshold(bytes) {
            Some(n) => (cfa_rule::PLT, n, Why::Plt),
            None => return (Rule::STOP, Why::CfaExpression),
        },
    };
    let rbp_offset = match rbp {
        Saved::Default | Saved::Undefined | Saved::SameValue => 0,
        Saved::Offset(n) if n != 0 && n % 8 == 0 => match i8::try_from(n / 8) {
            Ok(words) => words,
            Err(_) => return (Rule::STOP, Why::Rbp),
        },
        _ => return (Rule::STOP, Why::Rbp),
    };
    let rule = Rule {
        cfa_rule,
        cfa_offset,
        rbp_offset,
    };
    (rule, why)
}

/// N of the PLT expression (10 or 11: where in the 16-byte entry the
/// lazy-binding push has happened), None for any other expression.
fn plt_threshold(bytes: &[u8]) -> Option<u16> {
    if bytes.len() != PLT_EXPRESSION.len() {
        return None;
    }
    let n = bytes[PLT_N_AT].wrapping_sub(DW_OP_LIT0);
    let same = bytes
        .iter()
        .zip(PLT_EXPRESSION)
        .enumerate()
        .all(|(at, (&byte, expected))| at == PLT_N_AT || byte == expected);
    (same && matches!(n, 10 | 11)).then_some(u16::from(n))
}

/// A row before sorting: `gap` rows are the STOP after an FDE's end, which
/// lose to any FDE's own row at the same pc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Raw {
    pc: u64,
    gap: bool,
    rule: Rule,
}

/// The rows of every FDE, as they are read.
#[derive(Debug, Default)]
struct Rows {
    raw: Vec<Raw>,
    /// Each FDE's [start, end).
    spans: Vec<(u64, u64)>,
    fdes: usize,
    /// FDEs of at least 16 bytes, and those among them with a CFA on rbp.
    sized: usize,
    on_rbp: usize,
    /// The FDE being read: its span, where its rows begin in `raw`, and
    /// whether one of them put the CFA on rbp.
    current: Option<Current>,
}

#[derive(Clone, Copy, Debug)]
struct Current {
    start: u64,
    end: u64,
    first_row: usize,
    on_rbp: bool,
}

impl Rows {
    /// Room for an object's rows from its section's size: a row per 5 to
    /// 6 bytes of CFI and an FDE per 40 in libc, python and Rust binaries.
    fn with_capacity(section_bytes: usize) -> Self {
        Self {
            raw: Vec::with_capacity(section_bytes / 5 + 16),
            spans: Vec::with_capacity(section_bytes / 32 + 16),
            ..Self::default()
        }
    }

    fn begin(&mut self, start: u64, end: u64) {
        self.current = Some(Current {
            start,
            end,
            first_row: self.raw.len(),
            on_rbp: false,
        });
    }

    /// A row of the current FDE, from `start` to `end`; those empty or
    /// outside the FDE (a malformed advance) are dropped.
    fn row(&mut self, start: u64, end: u64, rule: Rule) {
        let Some(current) = &mut self.current else {
            return;
        };
        if start >= end || start < current.start || start >= current.end {
            return;
        }
        current.on_rbp |= rule.cfa_rule == cfa_rule::RBP;
        self.raw.push(Raw {
            pc: start,
            gap: false,
            rule,
        });
    }

    fn end(&mut self) {
        let Some(current) = self.current.take() else {
            return;
        };
        self.spans.push((current.start, current.end));
        if current.end - current.start >= 16 {
            self.sized += 1;
            self.on_rbp += usize::from(current.on_rbp);
        }
    }

    /// The current FDE could not be read whole: its range is one STOP row.
    fn abandon(&mut self) {
        let Some(current) = self.current.take() else {
            return;
        };
        self.raw.truncate(current.first_row);
        self.raw.push(Raw {
            pc: current.start,
            gap: false,
            rule: Rule::STOP,
        });
        self.spans.push((current.start, current.end));
    }

    fn frame_pointer_share(&self) -> f32 {
        if self.sized == 0 {
            return 0.0;
        }
        self.on_rbp as f32 / self.sized as f32
    }

    /// Sorted rows, with a STOP wherever no FDE covers the address after
    /// one ends, the FDE's own row winning over such a STOP at the same pc
    /// and each run of one rule merged into its first row.
    fn finish(mut self) -> Vec<UnwindRow> {
        self.spans.sort_unstable();
        // NB: a sweep over the spans rather than one STOP per FDE end: an
        // FDE overlapping the next must not cut it.
        let mut reach: Option<u64> = None;
        for &(start, end) in &self.spans {
            match reach {
                Some(covered) if start <= covered => reach = Some(covered.max(end)),
                _ => {
                    if let Some(covered) = reach {
                        self.raw.push(gap(covered));
                    }
                    reach = Some(end);
                }
            }
        }
        if let Some(covered) = reach {
            self.raw.push(gap(covered));
        }
        merge(self.raw)
    }
}

fn gap(pc: u64) -> Raw {
    Raw {
        pc,
        gap: true,
        rule: Rule::STOP,
    }
}

/// Sorts rows by pc, keeps the first at each pc (an FDE's own before a
/// gap, then in reading order) and drops each row whose rule is its
/// predecessor's.
fn merge(mut raw: Vec<Raw>) -> Vec<UnwindRow> {
    // NB: stable and adaptive: FDEs mostly come in address order already.
    raw.sort_by_key(|row| (row.pc, row.gap));
    let mut rows: Vec<UnwindRow> = Vec::with_capacity(raw.len());
    let mut last_pc = None;
    for Raw { pc, rule, .. } in raw {
        if last_pc == Some(pc) {
            continue;
        }
        last_pc = Some(pc);
        let Ok(pc) = u32::try_from(pc) else {
            break;
        };
        if rows.last().is_some_and(|last| {
            (last.cfa_rule, last.cfa_offset, last.rbp_offset)
                == (rule.cfa_rule, rule.cfa_offset, rule.rbp_offset)
        }) {
            continue;
        }
        rows.push(UnwindRow {
            pc,
            cfa_offset: rule.cfa_offset,
            cfa_rule: rule.cfa_rule,
            rbp_offset: rule.rbp_offset,
        });
    }
    rows.shrink_to_fit();
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::ObjectSymbol as _;
    use std::time::Instant;

    const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";
    const PYTHON: &str = "/usr/bin/python3.11";

    fn rsp(offset: u16) -> Rule {
        Rule {
            cfa_rule: cfa_rule::RSP,
            cfa_offset: offset,
            rbp_offset: 0,
        }
    }

    fn rbp(offset: u16, saved: i8) -> Rule {
        Rule {
            cfa_rule: cfa_rule::RBP,
            cfa_offset: offset,
            rbp_offset: saved,
        }
    }

    /// An FDE of `(pc, rule)` rows, each up to the next and the last up to
    /// `end`.
    fn fde(rows: &mut Rows, end: u64, fde_rows: &[(u64, Rule)]) {
        rows.fdes += 1;
        rows.begin(fde_rows[0].0, end);
        for (at, &(pc, rule)) in fde_rows.iter().enumerate() {
            let until = fde_rows.get(at + 1).map_or(end, |next| next.0);
            rows.row(pc, until, rule);
        }
        rows.end();
    }

    fn row(pc: u32, rule: Rule) -> UnwindRow {
        UnwindRow {
            pc,
            cfa_offset: rule.cfa_offset,
            cfa_rule: rule.cfa_rule,
            rbp_offset: rule.rbp_offset,
        }
    }

    #[test]
    fn gaps_between_fdes_stop() {
        let mut rows = Rows::default();
        fde(&mut rows, 0x20, &[(0x10, rsp(8)), (0x11, rsp(16))]);
        // Adjacent: no gap at 0x20.
        fde(&mut rows, 0x30, &[(0x20, rsp(8))]);
        // A gap from 0x30 to 0x40.
        fde(&mut rows, 0x50, &[(0x40, rsp(8))]);
        assert_eq!(
            rows.finish(),
            [
                row(0x10, rsp(8)),
                row(0x11, rsp(16)),
                row(0x20, rsp(8)),
                row(0x30, Rule::STOP),
                row(0x40, rsp(8)),
                row(0x50, Rule::STOP),
            ]
        );
    }

    #[test]
    fn fdes_out_of_order_and_overlapping_are_not_cut() {
        let mut rows = Rows::default();
        fde(&mut rows, 0x60, &[(0x40, rsp(8))]);
        fde(&mut rows, 0x48, &[(0x10, rsp(8)), (0x14, rbp(16, -2))]);
        assert_eq!(
            rows.finish(),
            [
                row(0x10, rsp(8)),
                row(0x14, rbp(16, -2)),
                row(0x40, rsp(8)),
                row(0x60, Rule::STOP),
            ]
        );
    }

    #[test]
    fn same_rules_merge_into_the_first() {
        let mut rows = Rows::default();
        fde(
            &mut rows,
            0x30,
            &[
                (0x10, rsp(8)),
                (0x14, rsp(16)),
                (0x18, rsp(16)),
                (0x1c, rsp(8)),
            ],
        );
        // Starts with the rule the previous one ended with.
        fde(&mut rows, 0x40, &[(0x30, rsp(8))]);
        assert_eq!(
            rows.finish(),
            [
                row(0x10, rsp(8)),
                row(0x14, rsp(16)),
                row(0x1c, rsp(8)),
                row(0x40, Rule::STOP),
            ]
        );
    }

    #[test]
    fn an_fde_row_beats_a_gap_at_the_same_pc() {
        let real = Raw {
            pc: 0x20,
            gap: false,
            rule: rsp(8),
        };
        let start = Raw {
            pc: 0x10,
            gap: false,
            rule: rsp(16),
        };
        // Whatever the order they come in.
        for raw in [vec![start, gap(0x20), real], vec![start, real, gap(0x20)]] {
            assert_eq!(merge(raw), [row(0x10, rsp(16)), row(0x20, rsp(8))]);
        }
        // And a gap at the pc of a row merged into its predecessor stays
        // merged too.
        let same = Raw {
            rule: rsp(16),
            ..real
        };
        assert_eq!(merge(vec![gap(0x20), same, start]), [row(0x10, rsp(16))]);
    }

    #[test]
    fn abandoned_fdes_are_one_stop() {
        let mut rows = Rows::default();
        fde(&mut rows, 0x10, &[(0x0, rsp(8))]);
        rows.begin(0x10, 0x20);
        rows.row(0x10, 0x14, rsp(8));
        rows.abandon();
        fde(&mut rows, 0x30, &[(0x20, rsp(8))]);
        assert_eq!(
            rows.finish(),
            [
                row(0x0, rsp(8)),
                row(0x10, Rule::STOP),
                row(0x20, rsp(8)),
                row(0x30, Rule::STOP),
            ]
        );
    }

    #[test]
    fn rules_follow_only_what_bpf_can() {
        let on_rsp = Cfa::Register(7, 16);
        assert_eq!(
            rule(&on_rsp, Saved::Default, Saved::Default),
            (rsp(16), Why::Followed)
        );
        assert_eq!(
            rule(&Cfa::Register(6, 16), Saved::Offset(-8), Saved::Offset(-16)),
            (rbp(16, -2), Why::Followed)
        );
        // The outermost frame, whatever the CFA.
        assert_eq!(
            rule(&Cfa::Expression(&[0x10]), Saved::Undefined, Saved::Other),
            (Rule::END, Why::Followed)
        );
        for (cfa, ra, saved_rbp, why) in [
            (
                Cfa::Register(3, 8),
                Saved::Default,
                Saved::Default,
                Why::CfaRegister,
            ),
            (
                Cfa::Register(7, -8),
                Saved::Default,
                Saved::Default,
                Why::CfaOffset,
            ),
            (
                Cfa::Register(7, 1 << 16),
                Saved::Default,
                Saved::Default,
                Why::CfaOffset,
            ),
            (
                on_rsp,
                Saved::Offset(-16),
                Saved::Default,
                Why::ReturnAddress,
            ),
            (on_rsp, Saved::SameValue, Saved::Default, Why::ReturnAddress),
            (on_rsp, Saved::Default, Saved::Offset(-12), Why::Rbp),
            (on_rsp, Saved::Default, Saved::Offset(-8 * 200), Why::Rbp),
            (on_rsp, Saved::Default, Saved::Offset(0), Why::Rbp),
            (on_rsp, Saved::Default, Saved::Other, Why::Rbp),
        ] {
            assert_eq!(
                rule(&cfa, ra, saved_rbp),
                (Rule::STOP, why),
                "{cfa:?} {ra:?} {saved_rbp:?}"
            );
        }
        let mut plt = PLT_EXPRESSION;
        for n in [10, 11] {
            plt[PLT_N_AT] = DW_OP_LIT0 + n;
            let expected = Rule {
                cfa_rule: cfa_rule::PLT,
                cfa_offset: u16::from(n),
                rbp_offset: 0,
            };
            assert_eq!(
                rule(&Cfa::Expression(&plt), Saved::Default, Saved::Default),
                (expected, Why::Plt)
            );
        }
        plt[PLT_N_AT] = DW_OP_LIT0 + 12;
        assert_eq!(plt_threshold(&plt), None);
        assert_eq!(plt_threshold(&PLT_EXPRESSION[..10]), None);
        let mut other = PLT_EXPRESSION;
        other[PLT_N_AT] = DW_OP_LIT0 + 11;
        other[1] = 0x10;
        assert_eq!(plt_threshold(&other), None);
    }

    fn strictly_sorted(table: &ObjectTable) {
        assert!(
            table.rows.windows(2).all(|pair| pair[0].pc < pair[1].pc),
            "rows out of order"
        );
    }

    #[test]
    fn libc_malloc_starts_on_rsp() {
        let data = std::fs::read(LIBC).expect("read libc");
        let table = ObjectTable::build(&data).expect("libc's table");
        assert!(table.rows.len() > 2000, "{} rows", table.rows.len());
        assert!(
            table.frame_pointer_share < 0.5,
            "{}",
            table.frame_pointer_share
        );
        strictly_sorted(&table);
        let file = object::File::parse(&*data).expect("parse libc");
        let malloc = file
            .dynamic_symbols()
            .find(|symbol| symbol.name() == Ok("malloc"))
            .expect("malloc in libc's dynamic symbols")
            .address();
        let at_malloc = table.lookup(malloc).expect("a row at malloc");
        assert_eq!(
            (
                at_malloc.cfa_rule,
                at_malloc.cfa_offset,
                at_malloc.rbp_offset
            ),
            (cfa_rule::RSP, 8, 0)
        );
        // The first row: nothing before it.
        let first = u64::from(table.rows[0].pc);
        assert_eq!(table.lookup(first.saturating_sub(1)).is_none(), first > 0);
    }

    #[test]
    fn plt_rows_in_plt() {
        for path in [LIBC, PYTHON, "/usr/bin/ls"] {
            let data = std::fs::read(path).expect("read");
            let table = ObjectTable::build(&data).expect("table");
            let file = object::File::parse(&*data).expect("parse");
            let plt = file.section_by_name(".plt").expect(".plt");
            let range = plt.address()..plt.address() + plt.size();
            let in_plt: Vec<_> = table
                .rows
                .iter()
                .filter(|row| row.cfa_rule == cfa_rule::PLT)
                .collect();
            assert!(!in_plt.is_empty(), "{path}: no PLT row");
            for row in in_plt {
                assert!(range.contains(&u64::from(row.pc)), "{path}: {row:?}");
                assert!(matches!(row.cfa_offset, 10 | 11), "{path}: {row:?}");
            }
        }
    }

    #[test]
    fn python_start_is_the_end() {
        let data = std::fs::read(PYTHON).expect("read python");
        let table = ObjectTable::build(&data).expect("python's table");
        strictly_sorted(&table);
        let file = object::File::parse(&*data).expect("parse");
        let entry = table.lookup(file.entry()).expect("a row at the entry");
        assert_eq!(entry.cfa_rule, cfa_rule::END, "{entry:?}");
    }

    #[test]
    fn bias_of_a_pie() {
        let data = std::fs::read("/usr/bin/ls").expect("read ls");
        let table = ObjectTable::build(&data).expect("ls's table");
        let &(offset, vaddr, _) = table
            .segments
            .iter()
            .find(|&&(offset, vaddr, size)| offset == vaddr && offset > 0 && size > 0)
            .expect("a segment with p_offset == p_vaddr");
        let start = 0x5555_5555_4000 + offset;
        assert_eq!(table.bias(start, offset), Some(start - offset));
        // Split further on (mprotect), the same bias.
        assert_eq!(table.bias(start + PAGE, offset + PAGE), Some(start - vaddr));
        assert_eq!(table.bias(start, u64::MAX / 2), None);
    }

    #[test]
    fn bias_of_a_page_shared_by_two_segments() {
        let table = ObjectTable {
            rows: Vec::new(),
            fdes: 0,
            frame_pointer_share: 0.0,
            // Text ends inside the page the data segment starts on, which
            // is linked one page above its file offset.
            segments: vec![(0, 0, 0x1800), (0x1a00, 0x2a00, 0x100)],
        };
        assert_eq!(table.bias(0x7000_1000, 0x1000), Some(0x7000_0000 - 0x1000));
        assert_eq!(table.bias(0x7000_1000, 0x1000 + PAGE), None);
    }

    /// The fallback, on a C program built without .eh_frame (when a C
    /// compiler and objcopy are there to build it).
    #[test]
    fn debug_frame_without_eh_frame() {
        use std::process::Command;
        let dir = std::env::temp_dir().join(format!("memscope-table-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let source = dir.join("f.c");
        let built = dir.join("f");
        std::fs::write(
            &source,
            "__attribute__((noinline)) int g(volatile char *b) { return b[0] * 3; }\n\
             int f(int x) { volatile char b[100]; b[0] = x; return g(b) + 1; }\n\
             int main(void) { return f(2); }\n",
        )
        .expect("write source");
        let compiled = Command::new("cc")
            .args([
                "-O1",
                "-g",
                "-fno-asynchronous-unwind-tables",
                "-fno-unwind-tables",
                "-o",
            ])
            .arg(&built)
            .arg(&source)
            .status()
            .is_ok_and(|status| status.success())
            && Command::new("objcopy")
                .args([
                    "--remove-section=.eh_frame",
                    "--remove-section=.eh_frame_hdr",
                ])
                .arg(&built)
                .status()
                .is_ok_and(|status| status.success());
        // NB: no skip: cc and objcopy come with the fixtures' toolchain.
        assert!(compiled, "cc or objcopy failed: .debug_frame not checked");
        let data = std::fs::read(&built).expect("read built");
        let _ = std::fs::remove_dir_all(&dir);
        let file = object::File::parse(&*data).expect("parse");
        assert!(file.section_by_name(".eh_frame").is_none());
        let table = ObjectTable::build(&data).expect("table from .debug_frame");
        strictly_sorted(&table);
        let f = file
            .symbols()
            .find(|symbol| symbol.name() == Ok("f"))
            .expect("f")
            .address();
        // NB: merged into g's row before it, when g ends where f starts.
        let at_f = table.lookup(f).expect("a row at f");
        assert_eq!((at_f.cfa_rule, at_f.cfa_offset), (cfa_rule::RSP, 8));
        // Its frame of 100 bytes, after the sub.
        assert!(
            table.rows.iter().any(|row| u64::from(row.pc) > f
                && row.cfa_rule == cfa_rule::RSP
                && row.cfa_offset > 100),
            "{:?}",
            table.rows
        );
    }

    #[test]
    fn not_elf_is_an_error() {
        assert!(matches!(
            ObjectTable::build(b"#!/bin/sh\n"),
            Err(TableError::NotElf(_))
        ));
        assert!(matches!(
            ObjectTable::read(Path::new("/nonexistent/memscope")),
            Err(TableError::Io { .. })
        ));
    }

    /// Figures for real objects: `cargo test -p memscope --lib
    /// unwind::table -- --nocapture`.
    #[test]
    fn figures() {
        let mut paths: Vec<PathBuf> = [LIBC, PYTHON, "/usr/bin/redis-server"]
            .iter()
            .map(PathBuf::from)
            .collect();
        if let Ok(versions) = std::fs::read_dir("/root/.pyenv/versions") {
            for version in versions.flatten() {
                let lib = version.path().join("lib/libpython3.12.so.1.0");
                if lib.exists() {
                    paths.push(lib);
                }
            }
        }
        paths.push(std::env::current_exe().expect("test binary"));
        for path in paths.iter().filter(|path| path.exists()) {
            let data = std::fs::read(path).expect("read");
            let started = Instant::now();
            let (table, stats) = build_with_stats(&data).expect("table");
            let took = started.elapsed();
            strictly_sorted(&table);
            let rbp_rows = table
                .rows
                .iter()
                .filter(|row| row.cfa_rule == cfa_rule::RBP)
                .count();
            let stop_rows = table
                .rows
                .iter()
                .filter(|row| row.cfa_rule == cfa_rule::STOP)
                .count();
            println!(
                "{}: {} rows ({rbp_rows} on rbp, {stop_rows} stop), {} fdes, fp share {:.3}, {took:?}\n  {stats:?}",
                path.display(),
                table.rows.len(),
                table.fdes,
                table.frame_pointer_share,
            );
        }
    }
}
