//! Distinct exit codes, so scripts can tell why memscope failed.

use memscope::{
    attach::AttachError, bpf::LoadError, output::OutputError, preflight::PreflightError,
    session::SessionError, target::TargetError,
};

pub const FAILURE: u8 = 1;
pub const NOT_PERMITTED: u8 = 3;
pub const NO_SUCH_PROCESS: u8 = 4;
pub const BPF_UNAVAILABLE: u8 = 5;
pub const COMMAND_NOT_FOUND: u8 = 6;
pub const UNSUPPORTED_TARGET: u8 = 7;
pub const OUTPUT_FAILED: u8 = 8;

pub fn for_error(error: &anyhow::Error) -> u8 {
    for cause in error.chain() {
        if let Some(e) = cause.downcast_ref::<SessionError>() {
            return for_session_error(e);
        }
        if cause.downcast_ref::<OutputError>().is_some() {
            return OUTPUT_FAILED;
        }
    }
    FAILURE
}

fn for_session_error(error: &SessionError) -> u8 {
    match error {
        SessionError::Preflight(PreflightError::NotPermitted)
        | SessionError::Load(LoadError::NotPermitted(_)) => NOT_PERMITTED,
        SessionError::Preflight(PreflightError::NoUprobes(_))
        | SessionError::Load(LoadError::Unavailable(_)) => BPF_UNAVAILABLE,
        SessionError::Target(TargetError::NoSuchProcess(_)) => NO_SUCH_PROCESS,
        SessionError::Target(
            TargetError::CommandNotFound(_) | TargetError::Exec { .. } | TargetError::EmptyCommand,
        ) => COMMAND_NOT_FOUND,
        SessionError::Attach(
            AttachError::NoAllocator(_)
            | AttachError::MissingSymbol { .. }
            | AttachError::ParseLibrary { .. }
            | AttachError::ReadLibrary { .. },
        ) => UNSUPPORTED_TARGET,
        SessionError::Attach(
            AttachError::Probe { .. }
            | AttachError::Load { .. }
            | AttachError::ProbeConflict { .. },
        ) => BPF_UNAVAILABLE,
        _ => FAILURE,
    }
}
