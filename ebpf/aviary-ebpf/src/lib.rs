#![no_std]
// This library target exists so the agent can build-depend on this crate: cargo then rebuilds
// the agent whenever the programs change. The programs themselves are the `aviary` binary.
