//! The f32 3x3, stride-1, padding-1 convolutions that the CPU ops run without im2col: Winograd's
//! F(4x4, 3x3) ([`crate::winograd4`]) for layers of 64 or more channels each way on maps of 32x32
//! and up; Winograd's F(2x2, 3x3) ([`crate::winograd`]) for the other layers of 128 or more
//! channels on maps of 8x8 and up (4x4 in groups of samples), or 64 or more on 16x16 and up; else
//! the direct kernel ([`crate::direct_conv`]) where it takes the shape (it beats im2col + gemm
//! there: 101-112 GFLOP/s on one core against 62-103, `direct_conv::timing`).
//!
//! On one core of this project's 2-core EPYC, over batches of 16 distinct samples
//! (`winograd::timing`, an ignored test, two runs): F(2x2) did 136-198 GFLOP/s of the direct
//! convolution's multiply-adds on 128-512 channels at 8x8 to 32x32, 1.46-1.95x the direct kernel,
//! and 1.39-1.52x on 64 channels at 32x32; with 64 channels at 16x16 it gained 1.00-1.20x (1.15x
//! a third time, and 1.06-1.08x on the whole adversarial training step of the embedded classifier,
//! whose second stage is 64 channels at 16x16), at 8x8 it lost (0.97-0.99x). On 4x4 maps one
//! sample's 4 tiles leave gemm too little (37-48 GFLOP/s on 128-512 channels); 16 samples per call
//! did 102-169 (128-2048 channels, 138-169 from 256 up), where im2col + gemm did 72-102. F(4x4)
//! then did 151-267 GFLOP/s where it is chosen (`winograd::timing`, see [`winograd4_wins`]).

use std::cell::RefCell;
use std::mem::MaybeUninit;

use candle_core::{DType, WithDType};

use crate::conv::Geometry;
use crate::parallel::split_by_sample;
use crate::{direct_conv, winograd, winograd4};

/// A layer's kernel, prepared for the convolution that does it.
pub(crate) enum Conv3x3 {
    /// Packed for [`direct_conv::conv3x3`].
    Direct(Vec<f32>),
    /// Transformed for [`winograd::F2`], F(2x2, 3x3).
    Winograd(Vec<f32>),
    /// Transformed for [`winograd4::F4`], F(4x4, 3x3).
    Winograd4(Vec<f32>),
}

/// One thread's buffers for [`Conv3x3::run`].
#[derive(Default)]
struct Scratch {
    padded: Vec<f32>,
    winograd: winograd::Scratch,
}

thread_local! {
    /// Kept from op to op: allocated per op, Winograd's buffers (4x the sample's input and output)
    /// came as fresh pages each time, and zeroing them took 9% of the guided sampling step.
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Whether Winograd does the layer of geometry `g`: 128 or more channels each way on maps whose
/// products get 16 or more columns per call (8x8 maps and up alone, 4x4 maps in groups of 4 or
/// more samples), or 64 or more channels from 16x16 up.
fn winograd_wins(g: &Geometry) -> bool {
    let (channels, side) = (g.c_in.min(g.c_out), g.rows.n.min(g.cols.n));
    let columns = winograd::F2.tiles(g.rows.n, g.cols.n) * winograd_group(g);
    winograd::F2.supports(g.rows.n, g.cols.n) && ((channels >= 128 && side >= 4 && columns >= 16) || (channels >= 64 && side >= 16))
}

/// Whether Winograd's F(4x4, 3x3) does the layer of geometry `g` (rather than F(2x2)): 64 or more
/// channels each way on maps of 32x32 and up. There, one sample at a time, it did 1.04-1.14x
/// F(2x2)'s speed on 64 channels and 1.18-1.47x on 128-384 channels (`winograd::timing`, four
/// runs). On 16x16 maps it gained 0.89-1.33x on one core, but lost on two in a batch of 16 (256
/// channels: 14-20 ms against 13-14); on 8x8 and 4x4 maps, where a sample has 4 or 1 of its tiles,
/// it only tied in groups of 4 or 16 samples.
fn winograd4_wins(g: &Geometry) -> bool {
    let (channels, side) = (g.c_in.min(g.c_out), g.rows.n.min(g.cols.n));
    winograd4::F4.supports(g.rows.n, g.cols.n) && channels >= 64 && side >= 32
}

/// How many samples one Winograd call takes for a layer of geometry `g`. One sample of an 8x8 or
/// larger map gives each product 16 or more columns, which gemm runs at full speed (grouping only
/// grew the working set: 8x8 maps did 137-178 GFLOP/s in groups of 4 or 16 against 139-183
/// alone); a 4x4 map's 4 columns leave it at 37-48 GFLOP/s alone and 102-169 in groups of 16
/// (`winograd::timing`; groups of 8 did about as well, groups of 2 and 4 less). Never more than a
/// thread's share of the batch.
fn winograd_group(g: &Geometry) -> usize {
    let per_thread = if split_by_sample(g.b) { g.b.div_ceil(crate::parallel::threads()) } else { g.b };
    let tiles = winograd::F2.tiles(g.rows.n, g.cols.n);
    if tiles >= 16 {
        1
    } else {
        (64 / tiles.max(1)).clamp(1, per_thread.max(1))
    }
}

impl Conv3x3 {
    /// The prepared kernel when a convolution of geometry `g` with this `weight` runs here: f32, 3x3,
    /// stride 1, padding 1, and a shape one of the three kernels takes (else im2col + gemm does it).
    pub(crate) fn plan<T: WithDType>(g: &Geometry, weight: &[T]) -> Option<Self> {
        let square = |a: &crate::conv::AxisGeometry| a.k == 3 && a.stride == 1 && a.padding == 1;
        if !(square(&g.rows) && square(&g.cols)) {
            return None;
        }
        let weight = as_f32(weight)?;
        let (c_in, c_out, h, w) = (g.c_in, g.c_out, g.rows.n, g.cols.n);
        if winograd4_wins(g) {
            Some(Conv3x3::Winograd4(winograd4::F4.transform_kernel(weight, c_out, c_in)))
        } else if winograd_wins(g) {
            Some(Conv3x3::Winograd(winograd::F2.transform_kernel(weight, c_out, c_in)))
        } else if direct_conv::supports(c_out, h, w) {
            Some(Conv3x3::Direct(direct_conv::pack_weight(weight, c_out, c_in)))
        } else {
            None
        }
    }

    /// How many samples one [`Conv3x3::run`] of geometry `g` (the one planned for) takes: the
    /// direct kernel and F(4x4) go one sample at a time, F(2x2) takes up to 16 of a 4x4 map at once.
    pub(crate) fn group(&self, g: &Geometry) -> usize {
        match self {
            Conv3x3::Direct(_) | Conv3x3::Winograd4(_) => 1,
            Conv3x3::Winograd(_) => winograd_group(g),
        }
    }

    /// `y = conv2d(x, weight, stride 1, padding 1)` for samples of the planned geometry, as many as
    /// `x` holds: `x` `[n, c_in, h, w]`, `y` `[n, c_out, h, w]` (overwritten); `threads` is gemm's
    /// parallelism.
    pub(crate) fn run<T: WithDType>(
        &self,
        x: &[T],
        y: &mut [MaybeUninit<T>],
        shape: (usize, usize, usize, usize),
        threads: gemm::Parallelism,
    ) {
        // `as_f32` checks that T is f32 (a plan is only made for f32).
        let x = as_f32(x).expect("a planned 3x3 convolution is f32");
        // SAFETY: T is f32, so the two slice types are the same.
        let y = unsafe { &mut *(y as *mut [MaybeUninit<T>] as *mut [MaybeUninit<f32>]) };
        let (c_in, c_out, h, w) = shape;
        let mut run = |scratch: &mut Scratch| match self {
            Conv3x3::Direct(packed) => {
                for (x, y) in x.chunks_exact(c_in * h * w).zip(y.chunks_exact_mut(c_out * h * w)) {
                    direct_conv::conv3x3(x, packed, y, &mut scratch.padded, shape)
                }
            }
            Conv3x3::Winograd(kernel) => winograd::F2.conv3x3(x, kernel, y, &mut scratch.winograd, shape, threads),
            Conv3x3::Winograd4(kernel) => winograd4::F4.conv3x3(x, kernel, y, &mut scratch.winograd, shape, threads),
        };
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => run(&mut scratch),
            // Re-entered on this thread: a caller's rayon task stolen while gemm's threads run
            // (`threads` is rayon's then) may be another convolution. It gets buffers of its own.
            Err(_) => run(&mut Scratch::default()),
        })
    }
}

/// `s` as f32 when `T` is f32.
fn as_f32<T: WithDType>(s: &[T]) -> Option<&[f32]> {
    // SAFETY: T is f32 itself.
    (T::DTYPE == DType::F32).then(|| unsafe { std::slice::from_raw_parts(s.as_ptr() as *const f32, s.len()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A convolution started while this thread's buffers are in use (re-entered through a stolen
    /// rayon task) runs on buffers of its own and gives the same result.
    #[test]
    fn reentrant_run_uses_its_own_buffers() {
        let shape @ (c_in, c_out, h, w) = (128, 128, 8, 8);
        let (x, weight) = direct_conv::tests::test_operands(c_in, c_out, h, w);
        let plan = Conv3x3::Winograd(winograd::F2.transform_kernel(&weight, c_out, c_in));
        let run = || {
            let mut y = vec![MaybeUninit::new(f32::NAN); c_out * h * w];
            plan.run(&x, &mut y, shape, gemm::Parallelism::None);
            y.into_iter().map(|v| unsafe { v.assume_init() }.to_bits()).collect::<Vec<_>>()
        };
        let alone = run();
        let nested = SCRATCH.with_borrow_mut(|_in_use| run());
        assert_eq!(alone, nested);
        assert!(alone.iter().all(|&b| f32::from_bits(b).is_finite()));
    }
}
