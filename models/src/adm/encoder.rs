//! `EncoderUNetModel`: the time-dependent classifier (the UNet's down path and middle block,
//! then a pooling head).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use super::blocks::{
    conv2d, Conv2d, linear_f32, qkv_attention, GroupNorm32, HeadOrder, PointwiseConv1d,
    TimeEmbed, TimestepSequential,
};
use super::unet::{yes, DownPath, TorsoSpec};

/// How the encoder turns its features into logits (`pool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pool {
    /// norm, SiLU, global average, 1x1 conv.
    Adaptive,
    /// norm, SiLU, CLIP-style attention pooling ([`AttentionPool2d`]).
    Attention,
    /// Spatial means of every block's output, concatenated, then Linear-ReLU-Linear (2048 wide).
    Spatial,
    /// As `Spatial` with Linear-GroupNorm-SiLU-Linear.
    SpatialV2,
}

impl std::str::FromStr for Pool {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "adaptive" => Ok(Pool::Adaptive),
            "attention" => Ok(Pool::Attention),
            "spatial" => Ok(Pool::Spatial),
            "spatial_v2" => Ok(Pool::SpatialV2),
            other => Err(format!(
                "unknown pool '{other}' (expected adaptive, attention, spatial or spatial_v2)"
            )),
        }
    }
}

/// The constructor arguments of guided-diffusion's `EncoderUNetModel` (names and meaning as in
/// Python; see [`super::UNetConfig`] for the conventions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderUNetConfig {
    pub image_size: usize,
    pub in_channels: usize,
    pub model_channels: usize,
    /// Number of classes (logits).
    pub out_channels: usize,
    pub num_res_blocks: usize,
    /// Downsampling rates at which attention is used.
    pub attention_resolutions: Vec<usize>,
    #[serde(default)]
    pub dropout: f64,
    pub channel_mult: Vec<f64>,
    #[serde(default = "yes")]
    pub conv_resample: bool,
    pub num_heads: usize,
    #[serde(default)]
    pub num_head_channels: Option<usize>,
    pub use_scale_shift_norm: bool,
    pub resblock_updown: bool,
    pub use_new_attention_order: bool,
    pub pool: Pool,
}

/// CLIP's attention pooling: the spatial mean is prepended as an extra token, a learned
/// positional embedding is added, and the mean token's attention output is projected to logits.
#[derive(Debug, Clone)]
pub struct AttentionPool2d {
    positional_embedding: Tensor,
    qkv_proj: PointwiseConv1d,
    c_proj: PointwiseConv1d,
    num_heads: usize,
}

impl AttentionPool2d {
    pub fn new(
        spatial_dim: usize,
        embed_dim: usize,
        num_head_channels: usize,
        output_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if num_head_channels == 0 || !embed_dim.is_multiple_of(num_head_channels) {
            candle_core::bail!(
                "attention pool at '{}': {embed_dim} channels are not divisible by num_head_channels {num_head_channels}",
                vb.prefix()
            )
        }
        Ok(Self {
            positional_embedding: vb
                .get((embed_dim, spatial_dim * spatial_dim + 1), "positional_embedding")?,
            qkv_proj: PointwiseConv1d::new(embed_dim, 3 * embed_dim, vb.pp("qkv_proj"))?,
            c_proj: PointwiseConv1d::new(embed_dim, output_dim, vb.pp("c_proj"))?,
            num_heads: embed_dim / num_head_channels,
        })
    }
}

impl Module for AttentionPool2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, _, _) = x.dims4()?;
        let x = x.reshape((b, c, ()))?;
        let x = Tensor::cat(&[&x.mean_keepdim(D::Minus1)?, &x], D::Minus1)?;
        let x = x.broadcast_add(&self.positional_embedding.unsqueeze(0)?)?;
        let h = qkv_attention(&self.qkv_proj.forward(&x)?, self.num_heads, HeadOrder::New)?;
        self.c_proj.forward(&h)?.narrow(2, 0, 1)?.squeeze(2)
    }
}

#[derive(Debug, Clone)]
enum Head {
    Adaptive { norm: GroupNorm32, proj: Conv2d },
    Attention { norm: GroupNorm32, pool: AttentionPool2d },
    Spatial { lin1: Linear, lin2: Linear },
    SpatialV2 { lin1: Linear, norm: GroupNorm32, lin2: Linear },
}

/// The time-dependent classifier: `forward(x_t, t)` gives logits of p(y | x_t, t).
#[derive(Debug, Clone)]
pub struct EncoderUNetModel {
    config: EncoderUNetConfig,
    time_embed: TimeEmbed,
    input_blocks: Vec<TimestepSequential>,
    middle_block: TimestepSequential,
    head: Head,
    dtype: DType,
}

/// Width of the hidden layer of the `spatial` pools (fixed in guided-diffusion).
const SPATIAL_HIDDEN: usize = 2048;

impl EncoderUNetModel {
    /// Builds the classifier from weights named as in guided-diffusion's state dict; the builder's
    /// dtype is the torso's convolution dtype, the head runs in f32 (as with `use_fp16`).
    pub fn new(config: &EncoderUNetConfig, vb: VarBuilder) -> Result<Self> {
        let c = config;
        let spec = TorsoSpec {
            in_channels: c.in_channels,
            model_channels: c.model_channels,
            channel_mult: &c.channel_mult,
            num_res_blocks: c.num_res_blocks,
            attention_resolutions: &c.attention_resolutions,
            conv_resample: c.conv_resample,
            num_heads: c.num_heads,
            num_head_channels: c.num_head_channels,
            use_scale_shift_norm: c.use_scale_shift_norm,
            resblock_updown: c.resblock_updown,
            use_new_attention_order: c.use_new_attention_order,
        };
        let f32_vb = vb.to_dtype(DType::F32);
        let time_embed = TimeEmbed::new(c.model_channels, f32_vb.pp("time_embed"))?;
        let DownPath {
            input_blocks,
            ch,
            ds,
            feature_size,
            ..
        } = spec.down_path(&vb)?;
        let middle_block = spec.middle(ch, vb.pp("middle_block"))?;
        let feature_size = feature_size + ch;
        let out = f32_vb.pp("out");
        let head = match c.pool {
            Pool::Adaptive => Head::Adaptive {
                norm: GroupNorm32::new(ch, out.pp("0"))?,
                proj: conv2d(ch, c.out_channels, 1, 1, out.pp("3"))?,
            },
            Pool::Attention => {
                let Some(hc) = c.num_head_channels else {
                    candle_core::bail!("pool 'attention' needs num_head_channels")
                };
                Head::Attention {
                    norm: GroupNorm32::new(ch, out.pp("0"))?,
                    pool: AttentionPool2d::new(c.image_size / ds, ch, hc, c.out_channels, out.pp("2"))?,
                }
            }
            Pool::Spatial => Head::Spatial {
                lin1: linear_f32(feature_size, SPATIAL_HIDDEN, out.pp("0"))?,
                lin2: linear_f32(SPATIAL_HIDDEN, c.out_channels, out.pp("2"))?,
            },
            Pool::SpatialV2 => Head::SpatialV2 {
                lin1: linear_f32(feature_size, SPATIAL_HIDDEN, out.pp("0"))?,
                norm: GroupNorm32::new(SPATIAL_HIDDEN, out.pp("1"))?,
                lin2: linear_f32(SPATIAL_HIDDEN, c.out_channels, out.pp("3"))?,
            },
        };
        Ok(Self {
            config: c.clone(),
            time_embed,
            input_blocks,
            middle_block,
            head,
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &EncoderUNetConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `x`: (N, C, H, W) f32, `timesteps`: (N). Returns logits (N, out_channels) in f32.
    pub fn forward(&self, x: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let emb = self.time_embed.forward(timesteps)?;
        let spatial = matches!(self.head, Head::Spatial { .. } | Head::SpatialV2 { .. });
        let spatial_mean = |h: &Tensor| h.to_dtype(x.dtype())?.mean((2, 3));
        let mut means = Vec::new();
        let mut h = x.to_dtype(self.dtype)?;
        for block in &self.input_blocks {
            h = block.forward(&h, &emb)?;
            if spatial {
                means.push(spatial_mean(&h)?);
            }
        }
        h = self.middle_block.forward(&h, &emb)?;
        let h = h.to_dtype(x.dtype())?;
        match &self.head {
            Head::Adaptive { norm, proj } => {
                let pooled = norm.forward_silu(&h)?.mean_keepdim((2, 3))?;
                proj.forward(&pooled)?.flatten_from(1)
            }
            Head::Attention { norm, pool } => pool.forward(&norm.forward_silu(&h)?),
            Head::Spatial { lin1, lin2 } => {
                means.push(spatial_mean(&h)?);
                let feats = Tensor::cat(&means, D::Minus1)?;
                lin2.forward(&lin1.forward(&feats)?.relu()?)
            }
            Head::SpatialV2 { lin1, norm, lin2 } => {
                means.push(spatial_mean(&h)?);
                let feats = Tensor::cat(&means, D::Minus1)?;
                lin2.forward(&norm.forward_silu(&lin1.forward(&feats)?)?)
            }
        }
    }

    /// d/dx of `sum_i log_softmax(logits_i)[y_i]`: the gradient guided-diffusion's `cond_fn`
    /// returns (before multiplying by the guidance scale). `x` must not be part of another graph.
    pub fn log_prob_grad(&self, x: &Tensor, timesteps: &Tensor, y: &Tensor) -> Result<Tensor> {
        let x = candle_core::Var::from_tensor(&x.detach())?;
        let logits = self.forward(x.as_tensor(), timesteps)?;
        let logp = super::blocks::log_softmax(&logits)?;
        let selected = logp.gather(&y.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
        let grads = selected.sum_all()?.backward()?;
        grads
            .get(x.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("classifier output does not depend on x".into()))
    }
}
