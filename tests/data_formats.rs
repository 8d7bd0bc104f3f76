//! The labelled-dataset readers (`bigroc::data::LabelledImages`) on the same 20 images as CIFAR-10
//! binary batches, CIFAR-10 python pickles and a PNG ImageFolder tar, made by
//! xtask/reference/data_fixtures.py (which checks them with pickle, numpy and torchvision's
//! ImageFolder). Pixels must match exactly: every format is lossless.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use bigroc::data::LabelledImages;
use candle_core::Device;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const N: usize = 20;
const CLASSES: [&str; 3] = ["bird", "cat", "deer"];

fn fixture(name: &str) -> PathBuf {
    Path::new(ROOT).join("tests/fixtures/data").join(name)
}

/// `pixel()` of the fixture script: image `i`, channel `c`, row `y`, column `x`.
fn pixel(i: usize, c: usize, y: usize, x: usize) -> u8 {
    ((29 * i + 80 * c + (3 + i % 4) * y + (1 + c) * x + (x * y) / 7) % 256) as u8
}

fn label(i: usize) -> u32 {
    ((7 * i + 1) % 3) as u32
}

/// Image `k` of `set` is image `i` of the generating formula (HWC layout).
fn assert_is_image(set: &LabelledImages, k: usize, i: usize) {
    let im = set.image(k);
    for y in 0..32 {
        for x in 0..32 {
            for c in 0..3 {
                assert_eq!(im[(y * 32 + x) * 3 + c], pixel(i, c, y, x), "{}: image {k} (y {y}, x {x}, c {c})", set.name(k));
            }
        }
    }
    assert_eq!(set.labels()[k], label(i), "{}", set.name(k));
}

fn err_of(r: Result<LabelledImages>) -> String {
    format!("{:#}", r.err().expect("an error"))
}

#[test]
fn cifar_binary_folder_holds_the_generated_images() -> Result<()> {
    let set = LabelledImages::open(&fixture("cifar-10-batches-bin"))?;
    assert_eq!((set.len(), set.height(), set.width()), (N, 32, 32));
    assert_eq!(set.class_names(), CLASSES);
    for i in 0..N {
        assert_is_image(&set, i, i);
    }
    assert_eq!((set.name(0), set.name(12)), ("data_batch_1.bin[0]", "data_batch_2.bin[0]"));
    assert_eq!(set.class_counts(), vec![6, 7, 7]);
    Ok(())
}

#[test]
fn cifar_python_folder_equals_the_binary_one() -> Result<()> {
    let bin = LabelledImages::open(&fixture("cifar-10-batches-bin"))?;
    let py = LabelledImages::open(&fixture("cifar-10-batches-py"))?;
    assert_eq!(py.pixels(), bin.pixels());
    assert_eq!(py.labels(), bin.labels());
    assert_eq!(py.class_names(), CLASSES);
    assert_eq!(py.name(19), "data_batch_2[7]");
    Ok(())
}

#[test]
fn imagefolder_tar_is_in_torchvision_order_with_the_same_pixels() -> Result<()> {
    let bin = LabelledImages::open(&fixture("cifar-10-batches-bin"))?;
    let tar = LabelledImages::open(&fixture("imagefolder.tar"))?;
    assert_eq!(tar.class_names(), CLASSES);
    // The archive lists images in reverse; the set is by (class, path), as torchvision's
    // ImageFolder orders the extracted tree (the fixture script checks that order).
    let mut order: Vec<usize> = (0..N).collect();
    order.sort_by_key(|&i| (label(i), i));
    assert_eq!(tar.len(), N);
    for (k, &i) in order.iter().enumerate() {
        assert_eq!(tar.name(k), format!("train/{}/{i:04}.png", CLASSES[label(i) as usize]));
        assert_is_image(&tar, k, i);
        assert_eq!(tar.image(k), bin.image(i));
    }
    Ok(())
}

#[test]
fn extracted_imagefolder_equals_the_tar() -> Result<()> {
    let dir = tempfile::tempdir()?;
    tar::Archive::new(std::fs::File::open(fixture("imagefolder.tar"))?).unpack(dir.path())?;
    let root = dir.path().join("train");
    std::fs::write(root.join("README.txt"), "files beside the class folders are not images of the set")?;
    std::fs::write(root.join("cat/.DS_Store"), "hidden files are passed over")?;
    let folder = LabelledImages::open(&root)?;
    let tar = LabelledImages::open(&fixture("imagefolder.tar"))?;
    assert_eq!(folder.pixels(), tar.pixels());
    assert_eq!(folder.labels(), tar.labels());
    assert_eq!(folder.class_names(), CLASSES);
    assert_eq!(folder.name(0), Path::new("bird/0002.png").display().to_string());
    Ok(())
}

#[test]
fn single_batch_files_and_batches() -> Result<()> {
    let bin = LabelledImages::open(&fixture("cifar-10-batches-bin"))?;
    let dev = Device::Cpu;
    for file in ["cifar-10-batches-bin/data_batch_2.bin", "cifar-10-batches-py/data_batch_2"] {
        let set = LabelledImages::open(&fixture(file))?;
        assert_eq!(set.len(), N - 12, "{file}");
        assert_eq!(set.class_names(), CLASSES, "{file}: names from batches.meta beside it");
        for k in 0..set.len() {
            assert_is_image(&set, k, 12 + k);
        }
    }
    // Batches: f32 NCHW in [0, 1] and u32 labels.
    let (x, y) = bin.batch(&[3, 0, 19], &dev)?;
    assert_eq!(x.dims(), &[3, 3, 32, 32]);
    for (b, &i) in [3usize, 0, 19].iter().enumerate() {
        for (c, y_, x_) in [(0, 0, 0), (1, 5, 31), (2, 31, 7)] {
            let v = x.get(b)?.get(c)?.get(y_)?.get(x_)?.to_scalar::<f32>()?;
            assert_eq!(v, pixel(i, c, y_, x_) as f32 / 255.0, "exactly v / 255 like torchvision's ToTensor");
        }
    }
    assert_eq!(y.to_vec1::<u32>()?, vec![label(3), label(0), label(19)]);
    assert!(format!("{:#}", bin.batch(&[20], &dev).unwrap_err()).contains("index 20 out of range"));
    Ok(())
}

fn copy_fixture_dir(name: &str, to: &Path) -> Result<PathBuf> {
    let dst = to.join(name);
    std::fs::create_dir_all(&dst)?;
    for entry in std::fs::read_dir(fixture(name))? {
        let entry = entry?;
        std::fs::copy(entry.path(), dst.join(entry.file_name()))?;
    }
    Ok(dst)
}

#[test]
fn bad_cifar_batches_are_named() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let bin = copy_fixture_dir("cifar-10-batches-bin", tmp.path())?;
    let py = copy_fixture_dir("cifar-10-batches-py", tmp.path())?;

    // A truncated binary batch.
    let b2 = bin.join("data_batch_2.bin");
    let bytes = std::fs::read(&b2)?;
    std::fs::write(&b2, &bytes[..bytes.len() - 100])?;
    let err = err_of(LabelledImages::open(&bin));
    assert!(err.contains("data_batch_2.bin") && err.contains("not a whole number of CIFAR-10 records"), "{err}");

    // A label beyond the 3 classes of batches.meta.txt.
    let mut bad = bytes.clone();
    bad[3 * 3073] = 9;
    std::fs::write(&b2, &bad)?;
    let err = err_of(LabelledImages::open(&bin));
    assert!(err.contains("data_batch_2.bin") && err.contains("image 3 has label 9") && err.contains("3 classes"), "{err}");

    // A missing batch in the middle.
    std::fs::write(&b2, &bytes)?;
    std::fs::rename(&b2, bin.join("data_batch_3.bin"))?;
    let err = err_of(LabelledImages::open(&bin));
    assert!(err.contains("data_batch_2.bin is missing"), "{err}");

    // Pickles: not the CIFAR dict, a float array, a newer protocol, a truncated file.
    let p2 = py.join("data_batch_2");
    let good = std::fs::read(&p2)?;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"\x80\x02}q\x00.".to_vec(), "no `data` key"),
        (replace(&good, b"U\x02u1", b"U\x02f8"), "`data`: dtype f8; expected uint8"),
        (replace(&good, b"\x80\x02", b"\x80\x04"), "pickle protocol 4"),
        (good[..good.len() / 2].to_vec(), "the pickle ends early"),
        (replace(&good, b"K\x01K\x02K\x00K\x01", b"K\x01K\x07K\x00K\x01"), "image 1 has label 7"),
    ];
    for (bytes, expected) in cases {
        std::fs::write(&p2, &bytes)?;
        let err = err_of(LabelledImages::open(&py));
        assert!(err.contains("data_batch_2") && err.contains(expected), "{expected}: {err}");
    }
    // A file that is none of the formats.
    std::fs::write(tmp.path().join("notes.txt"), "hello")?;
    let err = err_of(LabelledImages::open(&tmp.path().join("notes.txt")));
    assert!(err.contains("notes.txt") && err.contains("expected an ImageFolder"), "{err}");
    Ok(())
}

fn replace(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = bytes.windows(from.len()).position(|w| w == from).expect("pattern in the fixture");
    [&bytes[..at], to, &bytes[at + from.len()..]].concat()
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(vec![]);
    image::RgbImage::from_pixel(w, h, image::Rgb([1, 2, 3])).write_to(&mut buf, image::ImageFormat::Png).unwrap();
    buf.into_inner()
}

fn write_tar(path: &Path, members: &[(&str, Vec<u8>)]) -> Result<()> {
    let mut builder = tar::Builder::new(std::fs::File::create(path)?);
    for (name, data) in members {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        builder.append_data(&mut h, name, &data[..])?;
    }
    builder.into_inner()?;
    Ok(())
}

#[test]
fn bad_imagefolders_are_named() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let t = tmp.path().join("mixed.tar");
    write_tar(&t, &[("a/x.png", png(32, 32)), ("b/y.png", png(16, 32))])?;
    let err = err_of(LabelledImages::open(&t));
    assert!(err.contains("mixed.tar") && err.contains("a/x.png is 32x32") && err.contains("b/y.png is 16x32"), "{err}");

    write_tar(&t, &[("a/x.png", png(8, 8)), ("a/notes.txt", b"hi".to_vec())])?;
    let err = err_of(LabelledImages::open(&t));
    assert!(err.contains("mixed.tar: member a/notes.txt is not an image"), "{err}");

    write_tar(&t, &[("a/x.png", png(8, 8)), ("a/y.jpg", b"not a jpeg".to_vec())])?;
    let err = err_of(LabelledImages::open(&t));
    assert!(err.contains("mixed.tar: member a/y.jpg"), "{err}");

    write_tar(&t, &[("x.png", png(8, 8))])?;
    let err = err_of(LabelledImages::open(&t));
    assert!(err.contains("mixed.tar: member x.png is not in a class folder"), "{err}");

    let root = tmp.path().join("folder");
    for (rel, w) in [("cat/a.png", 8), ("dog/b.png", 9)] {
        std::fs::create_dir_all(root.join(rel).parent().unwrap())?;
        std::fs::write(root.join(rel), png(w, 8))?;
    }
    let err = err_of(LabelledImages::open(&root));
    assert!(err.contains("folder") && err.contains("cat/a.png is 8x8") && err.contains("dog/b.png is 9x8"), "{err}");
    std::fs::create_dir(root.join("emu"))?;
    let err = err_of(LabelledImages::open(&root));
    assert!(err.contains("class folder emu holds no images"), "{err}");
    Ok(())
}

/// The shared CIFAR-10 test split (skipped when ../shared is absent).
#[test]
fn shared_cifar10_test_tar() -> Result<()> {
    let path = Path::new(ROOT).join("../shared/data/cifar10/test.tar");
    if !path.exists() {
        eprintln!("SKIPPED: {} is absent", path.display());
        return Ok(());
    }
    let start = Instant::now();
    let set = LabelledImages::open(&path)?;
    println!("read {} images from {} in {:.2} s", set.len(), path.display(), start.elapsed().as_secs_f64());
    assert_eq!((set.len(), set.height(), set.width()), (10_000, 32, 32));
    assert_eq!(set.class_names(), bigroc::data::cifar::CIFAR10_CLASSES);
    assert_eq!(set.class_counts(), vec![1000; 10]);
    assert_eq!((set.name(0), set.name(9999)), ("test/airplane/0000.jpg", "test/truck/0999.jpg"));
    Ok(())
}

/// Timing of the 50,000-image training split: `cargo test --test data_formats -- --ignored`.
#[test]
#[ignore = "reads 50,000 JPEGs (seconds); run by hand for timing"]
fn shared_cifar10_train_tar() -> Result<()> {
    let path = Path::new(ROOT).join("../shared/data/cifar10/train.tar");
    if !path.exists() {
        eprintln!("SKIPPED: {} is absent", path.display());
        return Ok(());
    }
    let start = Instant::now();
    let set = LabelledImages::open(&path)?;
    println!("read {} images from {} in {:.2} s", set.len(), path.display(), start.elapsed().as_secs_f64());
    assert_eq!(set.len(), 50_000);
    assert_eq!(set.class_counts(), vec![5000; 10]);
    Ok(())
}
