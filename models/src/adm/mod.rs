//! OpenAI's ADM networks (guided-diffusion 1.0): the diffusion `UNetModel` and the
//! time-dependent classifier `EncoderUNetModel`, with the checkpoints' parameter names
//! (`input_blocks.0.0.weight`, `time_embed.0.weight`, `label_emb.weight`, `out.2.weight`, ...).

pub mod blocks;
mod encoder;
mod unet;

pub use blocks::{log_softmax, timestep_embedding, HeadOrder};
pub use encoder::{AttentionPool2d, EncoderUNetConfig, EncoderUNetModel, Pool};
pub use unet::{UNetConfig, UNetModel};
