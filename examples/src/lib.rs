//! Runnable services built with idem. The `payments` binary serves [`payments::app`] as
//! [`serve::serve_from_env`] configures it, through [`server::serve`] (the timeouts and limits of
//! a production server).

pub mod payments;
pub mod serve;
pub mod server;
