//! The f32 3x3, stride-1, padding-1 convolutions of one sample that the CPU ops run without
//! im2col: Winograd's F(2x2, 3x3) ([`crate::winograd`]) for layers of 128 or more channels each way
//! on maps of 8x8 and up, or 64 or more on 32x32 and up; else the direct kernel
//! ([`crate::direct_conv`]) where it takes the shape (it beats im2col + gemm there: 101-112 GFLOP/s
//! on one core against 62-103, `direct_conv::timing`).
//!
//! On one core of this project's 2-core EPYC, over batches of 16 distinct samples
//! (`winograd::timing`, an ignored test, two runs): Winograd did 136-198 GFLOP/s of the direct
//! convolution's multiply-adds on 128-512 channels at 8x8 to 32x32, 1.46-1.95x the direct kernel,
//! and 1.39-1.52x on 64 channels at 32x32; with 64 channels at 16x16 it gained 1.00-1.20x, at 8x8
//! it lost (0.97-0.99x), and on 4x4 maps its 4 tiles leave gemm too little (27-48 GFLOP/s).

use std::cell::RefCell;
use std::mem::MaybeUninit;

use candle_core::{DType, WithDType};

use crate::conv::Geometry;
use crate::{direct_conv, winograd};

/// A layer's kernel, prepared for the convolution that does it.
pub(crate) enum Conv3x3 {
    /// Packed for [`direct_conv::conv3x3`].
    Direct(Vec<f32>),
    /// Transformed for [`winograd::conv3x3`].
    Winograd(Vec<f32>),
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

/// Whether Winograd does a layer of `c_in -> c_out` channels on an `h x w` map: 128 or more
/// channels each way from 8x8 up, 64 or more from 32x32 up.
fn winograd_wins(c_in: usize, c_out: usize, h: usize, w: usize) -> bool {
    let (channels, side) = (c_in.min(c_out), h.min(w));
    winograd::supports(h, w) && ((channels >= 128 && side >= 8) || (channels >= 64 && side >= 32))
}

impl Conv3x3 {
    /// The prepared kernel when a convolution of geometry `g` with this `weight` runs here: f32, 3x3,
    /// stride 1, padding 1, and a shape one of the two kernels takes (else im2col + gemm does it).
    pub(crate) fn plan<T: WithDType>(g: &Geometry, weight: &[T]) -> Option<Self> {
        let square = |a: &crate::conv::AxisGeometry| a.k == 3 && a.stride == 1 && a.padding == 1;
        if !(square(&g.rows) && square(&g.cols)) {
            return None;
        }
        let weight = as_f32(weight)?;
        let (c_in, c_out, h, w) = (g.c_in, g.c_out, g.rows.n, g.cols.n);
        if winograd_wins(c_in, c_out, h, w) {
            Some(Conv3x3::Winograd(winograd::transform_kernel(weight, c_out, c_in)))
        } else if direct_conv::supports(c_out, h, w) {
            Some(Conv3x3::Direct(direct_conv::pack_weight(weight, c_out, c_in)))
        } else {
            None
        }
    }

    /// `y = conv2d(x, weight, stride 1, padding 1)` for one sample of the planned geometry: `x`
    /// `[c_in, h, w]`, `y` `[c_out, h, w]` (overwritten); `threads` is gemm's parallelism.
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
        let mut run = |scratch: &mut Scratch| match self {
            Conv3x3::Direct(packed) => direct_conv::conv3x3(x, packed, y, &mut scratch.padded, shape),
            Conv3x3::Winograd(kernel) => winograd::conv3x3(x, kernel, y, &mut scratch.winograd, shape, threads),
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
        let plan = Conv3x3::Winograd(winograd::transform_kernel(&weight, c_out, c_in));
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
