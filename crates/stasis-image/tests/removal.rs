//! Removing generations and whole job directories: hidden first, then deleted; leftovers of
//! interrupted removals are never generations and are cleaned up later; retention keeps the
//! newest generations.

use std::fs;
use std::path::Path;

use stasis_image::ImageError;
use stasis_image::generation::{
    REMOVING_PREFIX, generation_dir, list_generations, prune_generations, remove_generation,
    remove_job_dir, remove_leftovers,
};

/// A pid no process can have (above the kernel's largest `pid_max`, 2^22).
const DEAD_PID: u32 = 4_294_967;

fn fake_generation(job: &Path, n: u32, bytes: usize) {
    let dir = generation_dir(job, n);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("manifest"), vec![7u8; bytes]).unwrap();
    fs::write(dir.join("pages.pack"), vec![1u8; bytes]).unwrap();
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn remove_generation_leaves_the_others_and_nothing_hidden() {
    let root = tempfile::tempdir().unwrap();
    let job = root.path().join("job");
    for n in 1..=3 {
        fake_generation(&job, n, 10);
    }
    remove_generation(&job, 2).unwrap();
    assert_eq!(list_generations(&job), vec![1, 3]);
    assert_eq!(names(&job), vec!["gen-0001", "gen-0003"]);
    let err = remove_generation(&job, 2).unwrap_err();
    assert!(matches!(err, ImageError::NoGeneration { .. }), "{err}");
    assert!(err.to_string().contains("gen-0002"), "{err}");
}

#[test]
fn hidden_leftovers_are_not_generations_and_are_cleaned_up() {
    let root = tempfile::tempdir().unwrap();
    let job = root.path().join("job");
    fake_generation(&job, 1, 10);
    // An interrupted removal of generation 2 by a process that is gone, and a file that
    // only looks like a generation.
    let leftover = job.join(format!("{REMOVING_PREFIX}gen-0002-{DEAD_PID}-1"));
    fs::create_dir_all(&leftover).unwrap();
    fs::write(leftover.join("manifest"), b"x").unwrap();
    fs::write(job.join("gen-0005"), b"not a directory").unwrap();
    assert_eq!(list_generations(&job), vec![1]);
    // A removal by a live process (pid 1 always exists) is left alone.
    let live = job.join(format!("{REMOVING_PREFIX}gen-0003-1-1"));
    fs::create_dir_all(&live).unwrap();
    remove_leftovers(&job);
    assert!(!leftover.exists(), "a dead remover's leftover is deleted");
    assert!(live.exists(), "a live remover's directory is left to it");
}

#[test]
fn prune_keeps_the_newest() {
    let root = tempfile::tempdir().unwrap();
    let job = root.path().join("job");
    for n in 1..=5 {
        fake_generation(&job, n, 10);
    }
    assert_eq!(prune_generations(&job, 2).unwrap(), vec![1, 2, 3]);
    assert_eq!(list_generations(&job), vec![4, 5]);
    assert_eq!(prune_generations(&job, 2).unwrap(), Vec::<u32>::new());
    // Keeping zero still keeps the newest.
    assert_eq!(prune_generations(&job, 0).unwrap(), vec![4]);
    assert_eq!(list_generations(&job), vec![5]);
}

#[test]
fn remove_job_dir_removes_everything() {
    let root = tempfile::tempdir().unwrap();
    let job = root.path().join("job");
    let other = root.path().join("other");
    fake_generation(&job, 1, 10);
    fake_generation(&other, 1, 10);
    fs::write(job.join("output.log"), b"log").unwrap();
    let leftover = root
        .path()
        .join(format!("{REMOVING_PREFIX}old-{DEAD_PID}-9"));
    fs::create_dir_all(leftover.join("gen-0001")).unwrap();
    remove_job_dir(&job).unwrap();
    assert_eq!(names(root.path()), vec!["other"]);
    let err = remove_job_dir(&job).unwrap_err();
    assert!(err.to_string().contains("job"), "{err}");
}
