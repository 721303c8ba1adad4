//! A scratch directory for tests (the file source's YAML, the netns walk's fake pins).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

/// A scratch directory under the system temp dir, removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(purpose: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "topoproxy-{purpose}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A symbolic link at `relative` to `target`, its parents created.
    pub fn link(&self, relative: &str, target: &Path) {
        let path = self.0.join(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, path).unwrap();
    }

    pub fn write(&self, relative: &str, text: &str) -> PathBuf {
        let path = self.0.join(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, text).unwrap();
        path
    }

    /// Rewrites a file and gives it back its old mtime: what a same-size rewrite within the
    /// file system's timestamp granularity looks like to `stat`.
    pub fn rewrite_keeping_mtime(&self, relative: &str, text: &str) {
        let path = self.0.join(relative);
        let before = fs::metadata(&path).unwrap();
        let modified: SystemTime = before.modified().unwrap();
        assert_eq!(
            before.len(),
            text.len() as u64,
            "the rewrite must keep the size"
        );
        fs::write(&path, text).unwrap();
        let file = fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(modified).unwrap();
        let after = fs::metadata(&path).unwrap();
        assert_eq!(
            (after.len(), after.modified().unwrap()),
            (before.len(), modified)
        );
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A Service `prod/NAME` with one cluster IP: the same length for every IP of the same
/// length.
pub fn service(name: &str, cluster_ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: prod\n\
         spec:\n  clusterIP: {cluster_ip}\n  ports:\n  - name: http\n    port: 80\n"
    )
}
