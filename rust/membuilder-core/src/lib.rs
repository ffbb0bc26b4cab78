//! membuilder-core: everything deterministic and hot in membuilder, with no Python in it.
//!
//! Modules, one concept each:
//! - [`kinds`]: the shared vocabulary (agents, bank kinds, operations, actions).
//! - [`actions`]: parse a model's raw output into typed, validated actions per agent.
//! - [`state`]: the core block and the three banks of entries, two-phase apply (plan/commit).
//! - [`overlay`]: cheap views over a shared immutable base state, for RL rollouts.
//! - [`retrieval`]: exact and graph top-k search, single and batched.
//! - [`reward`]: format gate, length penalties, reward aggregation, attribution.
//! - [`persist`]: versioned, checksummed, atomically written state files.
//! - [`fused_scan`]: the x86-64 AVX2/FMA kernel behind exact search (score and select in one pass).
//! - [`fused_scan512`]: the same scan on AVX-512, chosen at run time where the CPU has it.
//! - [`bank`]: one bank's entries, contiguous vectors and graph (used by `state`).
//! - [`par`]: fork-safe use of rayon's global pool.
//! - [`cpu`]: the CPU's model and vector instruction sets, for reports of what ran where.

pub mod actions;
pub mod bank;
pub mod cpu;
#[cfg(target_arch = "x86_64")]
pub mod fused_scan;
#[cfg(target_arch = "x86_64")]
pub mod fused_scan512;
pub mod kinds;
pub mod overlay;
pub mod par;
pub mod persist;
pub mod retrieval;
pub mod reward;
pub mod state;
