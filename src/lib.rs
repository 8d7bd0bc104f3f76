pub mod adm;
pub mod diffusion;

pub fn placeholder() {}
