//! The adversarially robust ResNet classifiers BIGRoC refines with: the CIFAR-layout ResNets of the
//! `robustness` library (`cifar_models/resnet.py`) and the ImageNet-layout ResNets of torchvision
//! (which `robustness.imagenet_models` copies), with robustness' input normalization inside the model.
//!
//! Parameter names are those of the original state dicts with the wrapper prefixes stripped
//! (`module.model.` / `module.attacker.model.` in robustness checkpoints): `conv1`, `bn1`,
//! `layer{1..4}.{i}.conv1`, ..., the projection shortcut as `shortcut.0`/`shortcut.1` (CIFAR) or
//! `downsample.0`/`downsample.1` (ImageNet), and the head as `linear` (CIFAR) or `fc` (ImageNet).

use crate::conv::conv2d_const_weight;
use candle_core::{bail, DType, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::ops;

/// Which reference implementation's network layout (and parameter names) to follow.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// torchvision / robustness `imagenet_models`: 7x7 stride-2 stem, 3x3 max pool, global average
    /// pool, head `fc`, shortcut `downsample`.
    Imagenet,
    /// robustness `cifar_models`: 3x3 stride-1 stem, no max pool, `avg_pool2d(4)`, head `linear`,
    /// shortcut `shortcut`.
    Cifar,
}

/// Residual block type.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// Two 3x3 convolutions (ResNet-18/34).
    Basic,
    /// 1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4 (ResNet-50/101/152).
    Bottleneck,
}

impl BlockKind {
    /// Output channels per unit of block width.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// Architecture of a ResNet classifier, including the input normalization it was trained with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResNetConfig {
    pub layout: Layout,
    pub block: BlockKind,
    /// Residual blocks per stage.
    pub blocks: [usize; 4],
    /// Block width (planes) per stage; a stage outputs `width * block.expansion()` channels.
    pub widths: [usize; 4],
    pub num_classes: usize,
    /// Per-channel mean and standard deviation subtracted/divided after clamping pixels to [0, 1].
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// robustness `datasets.CIFAR` normalization.
pub const CIFAR_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
pub const CIFAR_STD: [f32; 3] = [0.2023, 0.1994, 0.2010];
/// robustness `datasets.ImageNet` (and torchvision) normalization.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

fn depth_blocks(depth: usize) -> Result<(BlockKind, [usize; 4])> {
    Ok(match depth {
        18 => (BlockKind::Basic, [2, 2, 2, 2]),
        34 => (BlockKind::Basic, [3, 4, 6, 3]),
        50 => (BlockKind::Bottleneck, [3, 4, 6, 3]),
        101 => (BlockKind::Bottleneck, [3, 4, 23, 3]),
        152 => (BlockKind::Bottleneck, [3, 8, 36, 3]),
        d => bail!("ResNet depth {d} is not one of 18, 34, 50, 101, 152"),
    })
}

impl ResNetConfig {
    /// robustness' CIFAR ResNet-`depth` with width multiplier `wm` (`ResNet50(wm=..)`): widths are
    /// `int(w * wm)` for w in 64, 128, 256, 512, as `cifar_models/resnet.py` computes them.
    pub fn cifar(depth: usize, wm: f64, num_classes: usize) -> Result<Self> {
        let (block, blocks) = depth_blocks(depth)?;
        if !(wm.is_finite() && wm > 0.0) {
            bail!("ResNet width multiplier must be positive, got {wm}")
        }
        let widths = [64usize, 128, 256, 512].map(|w| (w as f64 * wm) as usize);
        if widths.contains(&0) {
            bail!("ResNet width multiplier {wm} gives a zero width ({widths:?})")
        }
        Ok(Self {
            layout: Layout::Cifar,
            block,
            blocks,
            widths,
            num_classes,
            mean: CIFAR_MEAN,
            std: CIFAR_STD,
        })
    }

    /// torchvision's / robustness' ImageNet ResNet-`depth` (widths 64..512, ImageNet normalization).
    pub fn imagenet(depth: usize, num_classes: usize) -> Result<Self> {
        let (block, blocks) = depth_blocks(depth)?;
        Ok(Self {
            layout: Layout::Imagenet,
            block,
            blocks,
            widths: [64, 128, 256, 512],
            num_classes,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        })
    }

    /// Size of the pre-head feature vector ([`ResNet::forward_features`]).
    pub fn feature_dim(&self) -> usize {
        self.widths[3] * self.block.expansion()
    }
}

/// Bias-free convolution (every ResNet convolution is followed by batch norm).
#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv {
    fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get((c_out, c_in, kernel, kernel), "weight")?;
        Ok(Self {
            weight,
            stride,
            padding,
        })
    }

    /// The weight is a constant here (inference, PGD and guidance differentiate w.r.t. the image
    /// only): [`conv2d_const_weight`] skips the kernel gradient and computes the input gradient with
    /// im2col/col2im, several times faster than candle's conv2d backward on CPU.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let k = self.weight.dim(2)?;
        if h + 2 * self.padding < k || w + 2 * self.padding < k {
            bail!("ResNet: a {h}x{w} feature map is too small for a {k}x{k} convolution (input image too small)")
        }
        conv2d_const_weight(x, &self.weight, self.stride, self.padding)
    }
}

/// Inference-mode batch norm, folded into a per-channel scale and shift the way PyTorch's CPU kernel
/// evaluates it: `x * (weight / sqrt(var + eps)) + (bias - mean * weight / sqrt(var + eps))`.
/// `num_batches_tracked` is not needed and not requested.
#[derive(Debug, Clone)]
struct BatchNorm {
    scale: Tensor,
    shift: Tensor,
}

impl BatchNorm {
    const EPS: f64 = 1e-5;

    fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        let mean = vb.get(c, "running_mean")?;
        let var = vb.get(c, "running_var")?;
        let weight = vb.get(c, "weight")?;
        let bias = vb.get(c, "bias")?;
        let scale = (weight * (var + Self::EPS)?.sqrt()?.recip()?)?;
        let shift = (bias - (mean * &scale)?)?;
        Ok(Self {
            scale: scale.reshape((1, c, 1, 1))?,
            shift: shift.reshape((1, c, 1, 1))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_mul(&self.scale)?.broadcast_add(&self.shift)
    }
}

/// Convolution followed by batch norm: the projection shortcut of a block that changes shape.
#[derive(Debug, Clone)]
struct Shortcut {
    conv: Conv,
    bn: BatchNorm,
}

impl Shortcut {
    /// `None` when the block keeps its input's shape (identity shortcut).
    fn new(
        vb: VarBuilder,
        layout: Layout,
        c_in: usize,
        c_out: usize,
        stride: usize,
    ) -> Result<Option<Self>> {
        if stride == 1 && c_in == c_out {
            return Ok(None);
        }
        let vb = vb.pp(match layout {
            Layout::Cifar => "shortcut",
            Layout::Imagenet => "downsample",
        });
        let conv = Conv::new(vb.pp("0"), c_in, c_out, 1, stride, 0)?;
        let bn = BatchNorm::new(vb.pp("1"), c_out)?;
        Ok(Some(Self { conv, bn }))
    }

    fn forward(this: &Option<Self>, x: &Tensor) -> Result<Tensor> {
        match this {
            Some(s) => s.bn.forward(&s.conv.forward(x)?),
            None => Ok(x.clone()),
        }
    }
}

/// relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); the stride sits on conv1.
#[derive(Debug, Clone)]
pub struct BasicBlock {
    conv1: Conv,
    bn1: BatchNorm,
    conv2: Conv,
    bn2: BatchNorm,
    shortcut: Option<Shortcut>,
}

impl BasicBlock {
    fn new(
        vb: VarBuilder,
        layout: Layout,
        c_in: usize,
        planes: usize,
        stride: usize,
    ) -> Result<Self> {
        Ok(Self {
            conv1: Conv::new(vb.pp("conv1"), c_in, planes, 3, stride, 1)?,
            bn1: BatchNorm::new(vb.pp("bn1"), planes)?,
            conv2: Conv::new(vb.pp("conv2"), planes, planes, 3, 1, 1)?,
            bn2: BatchNorm::new(vb.pp("bn2"), planes)?,
            shortcut: Shortcut::new(vb, layout, c_in, planes, stride)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out = self.bn1.forward(&self.conv1.forward(x)?)?.relu()?;
        let out = self.bn2.forward(&self.conv2.forward(&out)?)?;
        (out + Shortcut::forward(&self.shortcut, x)?)?.relu()
    }
}

/// 1x1 reduce to `planes`, 3x3 (stride here, as torchvision >= 0.3 and robustness do), 1x1 expand to
/// `4 * planes`, plus shortcut. The inner width is `planes` (torchvision with groups=1, base_width=64).
#[derive(Debug, Clone)]
pub struct Bottleneck {
    conv1: Conv,
    bn1: BatchNorm,
    conv2: Conv,
    bn2: BatchNorm,
    conv3: Conv,
    bn3: BatchNorm,
    shortcut: Option<Shortcut>,
}

impl Bottleneck {
    fn new(
        vb: VarBuilder,
        layout: Layout,
        c_in: usize,
        planes: usize,
        stride: usize,
    ) -> Result<Self> {
        let c_out = planes * BlockKind::Bottleneck.expansion();
        Ok(Self {
            conv1: Conv::new(vb.pp("conv1"), c_in, planes, 1, 1, 0)?,
            bn1: BatchNorm::new(vb.pp("bn1"), planes)?,
            conv2: Conv::new(vb.pp("conv2"), planes, planes, 3, stride, 1)?,
            bn2: BatchNorm::new(vb.pp("bn2"), planes)?,
            conv3: Conv::new(vb.pp("conv3"), planes, c_out, 1, 1, 0)?,
            bn3: BatchNorm::new(vb.pp("bn3"), c_out)?,
            shortcut: Shortcut::new(vb, layout, c_in, c_out, stride)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out = self.bn1.forward(&self.conv1.forward(x)?)?.relu()?;
        let out = self.bn2.forward(&self.conv2.forward(&out)?)?.relu()?;
        let out = self.bn3.forward(&self.conv3.forward(&out)?)?;
        (out + Shortcut::forward(&self.shortcut, x)?)?.relu()
    }
}

#[derive(Debug, Clone)]
enum Block {
    Basic(BasicBlock),
    Bottleneck(Bottleneck),
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Block::Basic(b) => b.forward(x),
            Block::Bottleneck(b) => b.forward(x),
        }
    }
}

/// A ResNet classifier taking pixels in [0, 1]: robustness' `InputNormalize` (clamp, then
/// `(x - mean) / std`), the network, logits.
#[derive(Debug, Clone)]
pub struct ResNet {
    cfg: ResNetConfig,
    conv1: Conv,
    bn1: BatchNorm,
    /// `layers[stage][block]`.
    layers: Vec<Vec<Block>>,
    head: Linear,
    mean: Tensor,
    std: Tensor,
}

impl ResNet {
    /// Builds the network from `vb`, whose keys are the original state dict's without wrapper
    /// prefixes (see the module docs). The model's dtype and device are `vb`'s.
    pub fn new(cfg: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.widths.contains(&0) || cfg.blocks.contains(&0) || cfg.num_classes == 0 {
            bail!("ResNet config has a zero width, block count or class count: {cfg:?}")
        }
        let conv1 = match cfg.layout {
            Layout::Cifar => Conv::new(vb.pp("conv1"), 3, cfg.widths[0], 3, 1, 1)?,
            Layout::Imagenet => Conv::new(vb.pp("conv1"), 3, cfg.widths[0], 7, 2, 3)?,
        };
        let bn1 = BatchNorm::new(vb.pp("bn1"), cfg.widths[0])?;
        let expansion = cfg.block.expansion();
        let mut c_in = cfg.widths[0];
        let mut layers = Vec::with_capacity(4);
        for (stage, (&n_blocks, &planes)) in cfg.blocks.iter().zip(&cfg.widths).enumerate() {
            let vb_stage = vb.pp(format!("layer{}", stage + 1));
            let mut blocks = Vec::with_capacity(n_blocks);
            for i in 0..n_blocks {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let vb_block = vb_stage.pp(i.to_string());
                blocks.push(match cfg.block {
                    BlockKind::Basic => {
                        Block::Basic(BasicBlock::new(vb_block, cfg.layout, c_in, planes, stride)?)
                    }
                    BlockKind::Bottleneck => Block::Bottleneck(Bottleneck::new(
                        vb_block, cfg.layout, c_in, planes, stride,
                    )?),
                });
                c_in = planes * expansion;
            }
            layers.push(blocks);
        }
        let head_name = match cfg.layout {
            Layout::Cifar => "linear",
            Layout::Imagenet => "fc",
        };
        let head = candle_nn::linear(cfg.feature_dim(), cfg.num_classes, vb.pp(head_name))?;
        let channel_stat = |v: [f32; 3]| -> Result<Tensor> {
            Tensor::new(&v, vb.device())?
                .to_dtype(vb.dtype())?
                .reshape((1, 3, 1, 1))
        };
        Ok(Self {
            cfg: cfg.clone(),
            conv1,
            bn1,
            layers,
            head,
            mean: channel_stat(cfg.mean)?,
            std: channel_stat(cfg.std)?,
        })
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }

    /// robustness' `InputNormalize`: clamp pixels to [0, 1] (with PyTorch's clamp gradient: none at
    /// pixels exactly 0 or 1), then
    /// `(x - mean) / std` per channel.
    pub fn normalize(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() != 4 || dims[1] != 3 {
            bail!("ResNet expects images of shape (N, 3, H, W), got {dims:?}")
        }
        if x.dtype() != self.mean.dtype() {
            bail!(
                "ResNet input dtype {:?} differs from the model's {:?}",
                x.dtype(),
                self.mean.dtype()
            )
        }
        ops::clamp_with_torch_grad(x, 0.0, 1.0)?
            .broadcast_sub(&self.mean)?
            .broadcast_div(&self.std)
    }

    /// Pre-head features `(N, feature_dim)` of pixels `x` in [0, 1], shape `(N, 3, H, W)`.
    pub fn forward_features(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut x = self
            .bn1
            .forward(&self.conv1.forward(&self.normalize(x)?)?)?
            .relu()?;
        if self.cfg.layout == Layout::Imagenet {
            x = ops::max_pool2d(&x, 3, 2, 1)?;
        }
        for block in self.layers.iter().flatten() {
            x = block.forward(&x)?;
        }
        match self.cfg.layout {
            Layout::Cifar => {
                // robustness pools with avg_pool2d(4) and feeds the flattened result to a head sized for
                // one position: only a 4x4 final map (25..32 pixel inputs) is meaningful.
                let (_, _, fh, fw) = x.dims4()?;
                if (fh, fw) != (4, 4) {
                    bail!("CIFAR-layout ResNet needs inputs whose final feature map is 4x4 (e.g. 32x32); {h}x{w} gives {fh}x{fw}")
                }
                x.avg_pool2d(4)?.flatten_from(1)
            }
            Layout::Imagenet => x.flatten_from(2)?.mean(2),
        }
    }

    /// Logits `(N, num_classes)` of pixels `x` in [0, 1], shape `(N, 3, H, W)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.head.forward(&self.forward_features(x)?)
    }

    /// The model's dtype (that of its parameters).
    pub fn dtype(&self) -> DType {
        self.mean.dtype()
    }
}

impl Module for ResNet {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ResNet::forward(self, x)
    }
}
