//! Distinct exit codes, so scripts can tell why memscope failed.

use memscope::{
    attach::AttachError,
    bpf::LoadError,
    output::{OutputError, push::PushError},
    preflight::PreflightError,
    resources::ResourceError,
    session::SessionError,
    target::TargetError,
};

pub const FAILURE: u8 = 1;
/// Also clap's own code for a malformed command line.
pub const USAGE: u8 = 2;
pub const NOT_PERMITTED: u8 = 3;
pub const NO_SUCH_PROCESS: u8 = 4;
pub const BPF_UNAVAILABLE: u8 = 5;
pub const COMMAND_NOT_FOUND: u8 = 6;
pub const UNSUPPORTED_TARGET: u8 = 7;
pub const OUTPUT_FAILED: u8 = 8;
/// `memscope check` could not run (its 1 is a failed check).
pub const CHECK_ERROR: u8 = 2;

pub fn for_error(error: &anyhow::Error) -> u8 {
    // First, wherever it sits in the chain: the session may carry it as a
    // source under an error of its own.
    if error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<ResourceError>(),
            Some(ResourceError::KernelMemory { .. })
        )
    }) {
        return USAGE;
    }
    for cause in error.chain() {
        if let Some(e) = cause.downcast_ref::<SessionError>() {
            return for_session_error(e);
        }
        if cause.downcast_ref::<OutputError>().is_some() {
            return OUTPUT_FAILED;
        }
        match cause.downcast_ref::<PushError>() {
            Some(PushError::Unsupported(_)) => return USAGE,
            Some(_) => return OUTPUT_FAILED,
            None => {}
        }
        if cause
            .downcast_ref::<memscope::alert::WebhookError>()
            .is_some()
        {
            return USAGE;
        }
        match cause.downcast_ref::<memscope::mark::MarkError>() {
            Some(memscope::mark::MarkError::Signal { .. }) => return NOT_PERMITTED,
            Some(_) => return NO_SUCH_PROCESS,
            None => {}
        }
    }
    FAILURE
}

fn for_session_error(error: &SessionError) -> u8 {
    match error {
        SessionError::Preflight(PreflightError::NotPermitted)
        | SessionError::Load(LoadError::NotPermitted(_)) => NOT_PERMITTED,
        SessionError::Load(LoadError::Capacity(_)) => USAGE,
        SessionError::Preflight(PreflightError::NoUprobes(_))
        | SessionError::Load(LoadError::Unavailable(_)) => BPF_UNAVAILABLE,
        SessionError::Target(TargetError::NoSuchProcess(_) | TargetError::Zombie(_)) => {
            NO_SUCH_PROCESS
        }
        SessionError::Target(
            TargetError::KernelThread { .. }
            | TargetError::InitWithChildren
            | TargetError::MemscopeItself(_),
        ) => UNSUPPORTED_TARGET,
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
            | AttachError::ProbeConflict { .. }
            | AttachError::Multi(_),
        )
        | SessionError::MultiUprobe(_) => BPF_UNAVAILABLE,
        _ => FAILURE,
    }
}
