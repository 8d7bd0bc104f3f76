pub mod diffusion;

pub fn placeholder() {}
