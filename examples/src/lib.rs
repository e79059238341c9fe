//! Runnable services built with idem. The `payments` binary serves [`payments::app`] as
//! [`serve::serve_from_env`] configures it.

pub mod payments;
pub mod serve;
