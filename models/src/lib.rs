//! Native candle implementations of the architectures bigroc uses.

pub mod adm;
