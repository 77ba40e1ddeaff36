//! The cachecast publisher.
//!
//! [`Publisher`] turns an invalidation request into one protobuf event on the environment's
//! JetStream subject, then waits for the acknowledgement of every agent that was live in that
//! environment when the event was published. Its [`Outcome`] names each agent and what it
//! answered. [`http`] serves the same over a PlainID-compatible HTTP API.
//!
//! Publishers are stateless: any number of replicas can run, each subscribed to the acks
//! addressed to its own id and each keeping its own view of live agents.

pub mod api;
pub mod audit;
pub mod auth;
pub mod http;
mod membership;
mod outcome;
mod publisher;
pub mod server;
pub mod service;
pub mod validate;

pub use membership::{KnownCache, LiveAgent, Progress, ViewBehind};
pub use outcome::{AgentOutcome, Outcome};
pub use publisher::{
    InFlight, InvalidationRequest, PublishError, Publisher, PublisherError, Unavailable,
};
