//! CPython support in userspace. So far: the line tables of code objects
//! ([`LineTableFormat`]), decoded as CPython's own `PyCode_Addr2Line` does.

mod linetable;

pub use linetable::LineTableFormat;
