//! membuilder-core: everything deterministic and hot in membuilder, with no Python in it.
//!
//! Modules, one concept each (a module only uses modules listed above it in its group, so there
//! are no import cycles):
//!
//! Shared vocabulary and helpers
//! - [`kinds`]: the shared vocabulary (agents, bank kinds, operations, actions).
//! - [`par`]: fork-safe use of rayon's global pool.
//! - [`cpu`]: the CPU's model and vector instruction sets, for reports of what ran where.
//! - [`simd`]: plain element loops compiled per vector width, the widest chosen at run time.
//!
//! Model output
//! - [`actions`]: parse a model's raw output into typed, validated actions per agent.
//! - [`reward`]: format gate, length penalties, reward aggregation, attribution.
//!
//! Search kernels
//! - [`topk`]: the ranking rule and the bounded candidate lists the kernels fill.
//! - [`fused_scan`]: the x86-64 AVX2/FMA kernel behind exact search (score and select in one pass).
//! - [`fused_scan512`]: the same scan on AVX-512, chosen at run time where the CPU has it.
//! - [`retrieval`]: exact and graph top-k search over one matrix, single and batched.
//!
//! The text encoder
//! - [`amx_gemm`]: dense bf16 matrix products on AMX tiles (the exact-search tile step, kept whole).
//! - [`encoder`]: a BERT-style encoder's forward pass (multilingual-e5-small), for local embedding.
//!
//! The memory store
//! - [`error`]: the store's errors.
//! - [`config`]: settings fixed for the life of a state.
//! - [`records`]: provenance, entries, hits and commit reports (what a store takes and returns).
//! - [`vectors`]: checks of caller-supplied vectors.
//! - [`bank`]: one bank's entries, contiguous vectors and graph.
//! - [`snapshot`]: a state's body, and a view's delta on top of one.
//! - [`layers`]: reads through a base and an optional delta.
//! - [`search`]: the cross-layer search (base scan, view retirements, delta, one ranking).
//! - [`store`]: the [`Store`] trait and the plan/apply engine behind it.
//! - [`state`]: [`MemoryState`], a store that owns its body.
//! - [`overlay`]: [`StateView`], cheap views over a shared immutable base, for RL rollouts.
//! - [`persist`]: versioned, checksummed, atomically written state files.

pub mod actions;
#[cfg(target_arch = "x86_64")]
pub mod amx_gemm;
#[cfg(target_arch = "x86_64")]
pub mod amx_scan;
pub mod bank;
pub mod config;
pub mod cpu;
pub mod encoder;
pub mod error;
#[cfg(target_arch = "x86_64")]
pub mod fused_scan;
#[cfg(target_arch = "x86_64")]
pub mod fused_scan512;
pub mod kinds;
pub mod layers;
pub mod overlay;
pub mod par;
pub mod persist;
pub mod records;
pub mod retrieval;
pub mod reward;
pub mod search;
pub mod simd;
pub mod snapshot;
pub mod state;
pub mod store;
pub mod topk;
pub mod vectors;

pub use bank::normalize_text;
pub use config::{StateConfig, UpdateMode};
pub use error::StateError;
pub use layers::Layers;
pub use overlay::StateView;
pub use records::{CommitReport, Entry, Hit, Provenance, Unmatched};
pub use snapshot::{Delta, Snapshot};
pub use state::MemoryState;
pub use store::{Plan, Store};
