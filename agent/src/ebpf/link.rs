//! The bpf_link commands aya 0.14 keeps to itself (its links hide their descriptors, and it
//! uses BPF_LINK_UPDATE only for XDP and TC links it made): opening a pinned link, reading which
//! program it runs and where, replacing its program atomically, which is how a new agent takes
//! over the attachments a previous one left without a moment of no capture, and detaching it
//! however many references to it remain, which is how `uninstall` leaves nothing attached even
//! while an agent still runs.
#![allow(unsafe_code)]

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya_obj::generated::bpf_cmd;

/// `bpf_attr` for BPF_OBJ_GET.
#[repr(C)]
struct ObjGet {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `bpf_attr.info`, for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
struct ObjGetInfo {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The start of `struct bpf_link_info` (the kernel fills as much as it is given).
#[repr(C)]
#[derive(Default)]
struct BpfLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    /// The first word of the per-type union: a cgroup link's cgroup id.
    target: u64,
}

/// `bpf_attr.link_update`, as far as this command reads it (the kernel takes a shorter
/// `bpf_attr` and treats the rest as zero).
#[repr(C)]
struct LinkUpdate {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `bpf_attr.link_detach`.
#[repr(C)]
struct LinkDetach {
    link_fd: u32,
}

/// The return value: a new descriptor for the commands that make one.
fn bpf<T>(cmd: bpf_cmd, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, writable repr(C) prefix of `bpf_attr` for `cmd`, and its size is
    // passed along, so the kernel reads (and writes) no more than it holds; a buffer it points
    // to (a path, BpfLinkInfo) is live for the call and its size is in `attr` too.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret)
}

/// The link pinned at `path` (NotFound: nothing is pinned there).
pub fn open(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let fd = bpf(
        bpf_cmd::BPF_OBJ_GET,
        &mut ObjGet {
            pathname: path.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: 0,
        },
    )?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor, which nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What a link runs, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    /// The program the link runs.
    pub program_id: u32,
    /// For a cgroup link, the id of its cgroup (0 once the cgroup is gone); not meaningful for
    /// other links.
    pub cgroup_id: u64,
}

/// What `link` runs, and where.
pub fn info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut info = BpfLinkInfo::default();
    bpf(
        bpf_cmd::BPF_OBJ_GET_INFO_BY_FD,
        &mut ObjGetInfo {
            bpf_fd: link.as_raw_fd() as u32,
            info_len: std::mem::size_of::<BpfLinkInfo>() as u32,
            info: &mut info as *mut BpfLinkInfo as u64,
        },
    )?;
    Ok(LinkInfo {
        program_id: info.prog_id,
        cgroup_id: info.target,
    })
}

/// Makes `link` run `program` instead of the program it runs now, in one step (Linux 5.7+;
/// the program must be of the link's type and attach type). ENOLINK: the link's target went
/// away (an interface, a network namespace), and the link with it.
pub fn update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    bpf(
        bpf_cmd::BPF_LINK_UPDATE,
        &mut LinkUpdate {
            link_fd: link.as_raw_fd() as u32,
            new_prog_fd: program.as_raw_fd() as u32,
            flags: 0,
            old_prog_fd: 0,
        },
    )
    .map(drop)
}

/// Detaches `link` from its target at once (Linux 5.9+); its program is freed when the last
/// reference to the link goes.
pub fn detach(link: BorrowedFd<'_>) -> io::Result<()> {
    bpf(
        bpf_cmd::BPF_LINK_DETACH,
        &mut LinkDetach {
            link_fd: link.as_raw_fd() as u32,
        },
    )
    .map(drop)
}
