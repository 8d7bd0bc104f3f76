pub mod inception;
