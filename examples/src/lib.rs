//! Runnable services built with idem. The `payments` binary serves [`payments::app`].

pub mod payments;
