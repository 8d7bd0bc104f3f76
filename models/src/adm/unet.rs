//! `UNetModel`: ADM's noise-prediction network (guided-diffusion `unet.py`).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::{Deserialize, Serialize};

use super::blocks::{
    conv2d, Conv2d, AttentionBlock, Downsample, GroupNorm32, HeadOrder, Layer, ResBlock,
    ResBlockOpts, Resample, TimeEmbed, TimestepSequential, Upsample,
};

/// The constructor arguments of guided-diffusion's `UNetModel` (same names, same meaning; `dims`
/// is always 2 and `use_checkpoint`/`use_fp16` are replaced by the builder's dtype).
///
/// The improved-diffusion UNet (the robust-guidance paper's CIFAR-10 model) is this model with
/// `resblock_updown: false`, `use_new_attention_order: false` (its attention is the legacy head
/// order), `num_head_channels: None`, `conv_resample: true` and its own `channel_mult`; its
/// `rescale_timesteps` is a property of the diffusion, not of the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    pub image_size: usize,
    pub in_channels: usize,
    pub model_channels: usize,
    /// 3, or 6 with a learned variance (`learn_sigma`).
    pub out_channels: usize,
    pub num_res_blocks: usize,
    /// Downsampling rates (1, 2, 4, ...) at which attention is used, i.e. `image_size // res`
    /// of the scripts' `--attention_resolutions`.
    pub attention_resolutions: Vec<usize>,
    /// Recorded for completeness; inference ignores dropout.
    #[serde(default)]
    pub dropout: f64,
    pub channel_mult: Vec<f64>,
    #[serde(default = "yes")]
    pub conv_resample: bool,
    /// Class-conditional with this many classes (`label_emb`).
    #[serde(default)]
    pub num_classes: Option<usize>,
    pub num_heads: usize,
    /// Fixed width per attention head; overrides `num_heads` (`-1` in Python is `None`).
    #[serde(default)]
    pub num_head_channels: Option<usize>,
    /// Heads in the output blocks' attention; `None` means `num_heads` (`-1` in Python).
    #[serde(default)]
    pub num_heads_upsample: Option<usize>,
    pub use_scale_shift_norm: bool,
    pub resblock_updown: bool,
    pub use_new_attention_order: bool,
}

pub(crate) fn yes() -> bool {
    true
}

/// The part of the configuration the input blocks and the middle block depend on; shared by
/// `UNetModel` and `EncoderUNetModel`.
pub(crate) struct TorsoSpec<'a> {
    pub in_channels: usize,
    pub model_channels: usize,
    pub channel_mult: &'a [f64],
    pub num_res_blocks: usize,
    pub attention_resolutions: &'a [usize],
    pub conv_resample: bool,
    pub num_heads: usize,
    pub num_head_channels: Option<usize>,
    pub use_scale_shift_norm: bool,
    pub resblock_updown: bool,
    pub use_new_attention_order: bool,
}

/// The built down path: input blocks, the channel count after each one (for the skip
/// connections), the final channel count and downsampling rate, and the sum of all block widths
/// (`_feature_size`, the input width of the `spatial` pools).
pub(crate) struct DownPath {
    pub input_blocks: Vec<TimestepSequential>,
    pub block_chans: Vec<usize>,
    pub ch: usize,
    pub ds: usize,
    pub feature_size: usize,
}

impl TorsoSpec<'_> {
    pub fn res_opts(&self) -> ResBlockOpts {
        ResBlockOpts {
            emb_channels: 4 * self.model_channels,
            use_scale_shift_norm: self.use_scale_shift_norm,
        }
    }

    pub fn order(&self) -> HeadOrder {
        if self.use_new_attention_order {
            HeadOrder::New
        } else {
            HeadOrder::Legacy
        }
    }

    pub fn width(&self, mult: f64) -> usize {
        (mult * self.model_channels as f64) as usize
    }

    pub fn attention(&self, ch: usize, heads: usize, vb: VarBuilder) -> Result<AttentionBlock> {
        AttentionBlock::new(ch, heads, self.num_head_channels, self.order(), vb)
    }

    pub fn check(&self) -> Result<()> {
        if self.channel_mult.is_empty() {
            candle_core::bail!("channel_mult is empty")
        }
        if self.model_channels == 0 || self.num_heads == 0 {
            candle_core::bail!("model_channels and num_heads must be positive")
        }
        Ok(())
    }

    /// `input_blocks`: a stem conv, then per level `num_res_blocks` ResBlocks (+ attention at the
    /// listed rates) and, except at the last level, a downsampling block.
    pub fn down_path(&self, vb: &VarBuilder) -> Result<DownPath> {
        self.check()?;
        let opts = self.res_opts();
        let mut ch = self.width(self.channel_mult[0]);
        let stem = conv2d(self.in_channels, ch, 3, 1, vb.pp("input_blocks.0.0"))?;
        let mut input_blocks = vec![TimestepSequential {
            layers: vec![Layer::Conv(stem)],
        }];
        let mut block_chans = vec![ch];
        let mut feature_size = ch;
        let mut ds = 1;
        for (level, &mult) in self.channel_mult.iter().enumerate() {
            for _ in 0..self.num_res_blocks {
                let vbi = vb.pp(format!("input_blocks.{}", input_blocks.len()));
                let out = self.width(mult);
                let mut layers = vec![Layer::Res(ResBlock::new(
                    ch,
                    out,
                    Resample::None,
                    opts,
                    vbi.pp("0"),
                )?)];
                ch = out;
                if self.attention_resolutions.contains(&ds) {
                    layers.push(Layer::Attn(self.attention(ch, self.num_heads, vbi.pp("1"))?));
                }
                input_blocks.push(TimestepSequential { layers });
                feature_size += ch;
                block_chans.push(ch);
            }
            if level + 1 != self.channel_mult.len() {
                let vbi = vb.pp(format!("input_blocks.{}.0", input_blocks.len()));
                let layer = if self.resblock_updown {
                    Layer::Res(ResBlock::new(ch, ch, Resample::Down, opts, vbi)?)
                } else {
                    Layer::Down(Downsample::new(ch, self.conv_resample, ch, vbi)?)
                };
                input_blocks.push(TimestepSequential {
                    layers: vec![layer],
                });
                block_chans.push(ch);
                ds *= 2;
                feature_size += ch;
            }
        }
        Ok(DownPath {
            input_blocks,
            block_chans,
            ch,
            ds,
            feature_size,
        })
    }

    /// `middle_block`: ResBlock, attention, ResBlock at the lowest resolution.
    pub fn middle(&self, ch: usize, vb: VarBuilder) -> Result<TimestepSequential> {
        let opts = self.res_opts();
        Ok(TimestepSequential {
            layers: vec![
                Layer::Res(ResBlock::new(ch, ch, Resample::None, opts, vb.pp("0"))?),
                Layer::Attn(self.attention(ch, self.num_heads, vb.pp("1"))?),
                Layer::Res(ResBlock::new(ch, ch, Resample::None, opts, vb.pp("2"))?),
            ],
        })
    }
}

/// The full UNet: timestep (and class) embedding, down path, middle, up path with skip
/// concatenation, and the output head `out` (norm, SiLU, 3x3 conv).
#[derive(Debug, Clone)]
pub struct UNetModel {
    config: UNetConfig,
    time_embed: TimeEmbed,
    label_emb: Option<Embedding>,
    input_blocks: Vec<TimestepSequential>,
    middle_block: TimestepSequential,
    output_blocks: Vec<TimestepSequential>,
    out_norm: GroupNorm32,
    out_conv: Conv2d,
    dtype: DType,
}

impl UNetModel {
    /// Builds the model from weights named as in guided-diffusion's state dict. The builder's
    /// dtype is the compute dtype of the torso's convolutions (f32, or f16/bf16 like
    /// `use_fp16`); everything else is loaded and computed in f32.
    pub fn new(config: &UNetConfig, vb: VarBuilder) -> Result<Self> {
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
        let label_emb = match c.num_classes {
            Some(n) => Some(candle_nn::embedding(
                n,
                4 * c.model_channels,
                f32_vb.pp("label_emb"),
            )?),
            None => None,
        };
        let DownPath {
            input_blocks,
            mut block_chans,
            mut ch,
            mut ds,
            ..
        } = spec.down_path(&vb)?;
        let middle_block = spec.middle(ch, vb.pp("middle_block"))?;

        let opts = spec.res_opts();
        let heads_up = c.num_heads_upsample.unwrap_or(c.num_heads);
        let mut output_blocks = Vec::new();
        for (level, &mult) in c.channel_mult.iter().enumerate().rev() {
            for i in 0..=c.num_res_blocks {
                let vbo = vb.pp(format!("output_blocks.{}", output_blocks.len()));
                let skip_ch = block_chans.pop().expect("one skip per input block");
                let out = spec.width(mult);
                let mut layers = vec![Layer::Res(ResBlock::new(
                    ch + skip_ch,
                    out,
                    Resample::None,
                    opts,
                    vbo.pp("0"),
                )?)];
                ch = out;
                if c.attention_resolutions.contains(&ds) {
                    let vba = vbo.pp(layers.len());
                    layers.push(Layer::Attn(spec.attention(ch, heads_up, vba)?));
                }
                if level != 0 && i == c.num_res_blocks {
                    let vbu = vbo.pp(layers.len());
                    layers.push(if c.resblock_updown {
                        Layer::Res(ResBlock::new(ch, ch, Resample::Up, opts, vbu)?)
                    } else {
                        Layer::Up(Upsample::new(ch, c.conv_resample, ch, vbu)?)
                    });
                    ds /= 2;
                }
                output_blocks.push(TimestepSequential { layers });
            }
        }
        let input_ch = spec.width(c.channel_mult[0]);
        let out_norm = GroupNorm32::new(ch, f32_vb.pp("out.0"))?;
        let out_conv = conv2d(input_ch, c.out_channels, 3, 1, f32_vb.pp("out.2"))?;
        Ok(Self {
            config: c.clone(),
            time_embed,
            label_emb,
            input_blocks,
            middle_block,
            output_blocks,
            out_norm,
            out_conv,
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The torso's compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `x`: (N, C, H, W) f32; `timesteps`: (N) (integer or fractional steps, as the diffusion
    /// passes them); `y`: (N) integer labels, required exactly when the model is
    /// class-conditional. Returns (N, out_channels, H, W) in f32.
    pub fn forward(&self, x: &Tensor, timesteps: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        let mut emb = self.time_embed.forward(timesteps)?;
        match (&self.label_emb, y) {
            (Some(label_emb), Some(y)) => {
                let n = x.dim(0)?;
                if y.dims() != [n] {
                    candle_core::bail!("labels y must have shape ({n}), got {:?}", y.dims())
                }
                emb = (emb + label_emb.forward(y)?)?;
            }
            (None, None) => {}
            (Some(_), None) => candle_core::bail!("class-conditional UNet needs labels y"),
            (None, Some(_)) => {
                candle_core::bail!("UNet is not class-conditional but labels y were given")
            }
        }
        let mut hs = Vec::with_capacity(self.input_blocks.len());
        let mut h = x.to_dtype(self.dtype)?;
        for block in &self.input_blocks {
            h = block.forward(&h, &emb)?;
            hs.push(h.clone());
        }
        h = self.middle_block.forward(&h, &emb)?;
        for block in &self.output_blocks {
            let skip = hs.pop().expect("one skip per output block");
            h = block.forward(&Tensor::cat(&[&h, &skip], 1)?, &emb)?;
        }
        let h = h.to_dtype(x.dtype())?;
        self.out_conv.forward(&self.out_norm.forward_silu(&h)?)
    }
}
