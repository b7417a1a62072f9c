//! A raw image file or block device as a [`BlockBackend`]. Calls are positional (`pread`,
//! `pwrite`, `fallocate`), so every connection shares one descriptor and a flush on any of them
//! covers the writes of all (multi-conn).
//!
//! I/O runs inline on the calling task: for an image in the page cache a hand-off to another
//! thread costs more than the call itself.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use nix::fcntl::PosixFadviseAdvice;

use crate::backend::{BlockBackend, Capabilities, Extent, ZeroError, ZeroMode};

#[derive(Debug)]
pub struct FileBackend {
    file: File,
    path: PathBuf,
    size_bytes: u64,
    read_only: bool,
}

/// Zeroes written when the file system cannot zero a range by itself.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

impl FileBackend {
    /// Opens a raw image (or block device) for serving.
    pub fn open(path: &Path, read_only: bool) -> io::Result<FileBackend> {
        let mut file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let meta = file.metadata()?;
        let size_bytes = if meta.file_type().is_block_device() {
            file.seek(SeekFrom::End(0))?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ));
        };
        Ok(FileBackend {
            file,
            path: path.to_owned(),
            size_bytes,
            read_only,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fallocate(
        &self,
        mode: nix::fcntl::FallocateFlags,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        let (offset, length) = (offset as libc::off_t, length as libc::off_t);
        nix::fcntl::fallocate(self.file.as_raw_fd(), mode, offset, length).map_err(io::Error::from)
    }

    /// Zeroes through the file system (no data written); `Unsupported` when it cannot.
    fn zero_in_place(&self, offset: u64, length: u64, no_hole: bool) -> io::Result<()> {
        use nix::fcntl::FallocateFlags as F;
        let mode = if no_hole {
            F::FALLOC_FL_ZERO_RANGE | F::FALLOC_FL_KEEP_SIZE
        } else {
            F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE
        };
        self.fallocate(mode, offset, length)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENODEV) | Some(libc::EINVAL) => {
                    io::Error::new(io::ErrorKind::Unsupported, e)
                }
                _ => e,
            })
    }

    fn write_zero_bytes(&self, mut offset: u64, length: u64) -> io::Result<()> {
        let end = offset + length;
        while offset < end {
            let n = (end - offset).min(ZEROES.len() as u64) as usize;
            self.file.write_all_at(&ZEROES[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Next offset at or after `offset` where `whence` (SEEK_DATA or SEEK_HOLE) starts, or `None`
    /// when the file system cannot tell.
    fn seek(&self, offset: u64, whence: nix::unistd::Whence) -> io::Result<Option<u64>> {
        match nix::unistd::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) {
            Ok(at) => Ok(Some(at as u64)),
            // ENXIO: no data past `offset` (for SEEK_DATA), i.e. a hole up to the end.
            Err(nix::errno::Errno::ENXIO) => Ok(Some(self.size_bytes)),
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::EOPNOTSUPP) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Drops the range's clean pages from the page cache (`POSIX_FADV_DONTNEED`; dirty ones
    /// stay). A scan of the whole image (the proxy's seed and resync) calls it behind its reads,
    /// so that it does not leave the image cached: read ahead in large folios, such pages make
    /// the guest's 4k writes several times slower on kernels whose ext4 uses large folios.
    pub fn uncache(&self, offset: u64, length: u64) {
        // Advice only: a failure leaves the pages cached.
        let _ = self.advise(offset, length, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    }

    fn advise(&self, offset: u64, length: u64, advice: PosixFadviseAdvice) -> io::Result<()> {
        nix::fcntl::posix_fadvise(self.file.as_raw_fd(), offset as i64, length as i64, advice)?;
        Ok(())
    }

    fn sync_if(&self, fua: bool) -> io::Result<()> {
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

impl BlockBackend for FileBackend {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.read_only,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            multi_conn: true,
            rotational: false,
        }
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.file.write_all_at(data, offset)?;
        self.sync_if(fua)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> Result<(), ZeroError> {
        match self.zero_in_place(offset, length, mode.no_hole) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                if mode.fast_only {
                    return Err(ZeroError::NotFast);
                }
                self.write_zero_bytes(offset, length)?;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(self.sync_if(fua)?)
    }

    async fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        // A trim is advice: where holes cannot be punched the data simply stays.
        match self.zero_in_place(offset, length, false) {
            Err(e) if e.kind() != io::ErrorKind::Unsupported => return Err(e),
            _ => {}
        }
        self.sync_if(fua)
    }

    async fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    async fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.advise(offset, length, PosixFadviseAdvice::POSIX_FADV_WILLNEED)
    }

    async fn extents(
        &self,
        offset: u64,
        length: u64,
        max: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        use nix::unistd::Whence;
        let end = offset + length;
        let mut at = offset;
        let mut count = 0;
        while at < end && count < max.max(1) {
            let Some(data_at) = self.seek(at, Whence::SeekData)? else {
                // No hole information: everything is data.
                out.push(Extent {
                    length: end - at,
                    hole: false,
                    zero: false,
                });
                return Ok(());
            };
            let (run_end, hole) = if data_at > at {
                (data_at, true)
            } else {
                (self.seek(at, Whence::SeekHole)?.unwrap_or(end), false)
            };
            // A file truncated or extended under us must not produce an empty or endless run.
            let run_end = run_end.clamp(at + 1, end);
            out.push(Extent {
                length: run_end - at,
                hole,
                zero: hole,
            });
            at = run_end;
            count += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn write_read_zero_trim_and_extents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        let f = File::create(&path).expect("create");
        f.set_len(4 << 20).expect("set_len");
        let b = FileBackend::open(&path, false).expect("open");
        assert_eq!(b.size_bytes(), 4 << 20);
        block_on(async {
            b.write(1 << 20, &[0xab; 8192], true).await.expect("write");
            let mut buf = vec![0; 8192];
            b.read(1 << 20, &mut buf).await.expect("read");
            assert!(buf.iter().all(|&x| x == 0xab));
            let mut ext = Vec::new();
            b.extents(0, 4 << 20, 16, &mut ext).await.expect("extents");
            assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 4 << 20);
            assert!(ext[0].hole, "start of a sparse file is a hole: {ext:?}");
            assert!(ext.iter().any(|e| !e.hole));
            let mode = ZeroMode {
                no_hole: false,
                fast_only: true,
            };
            b.write_zeroes(1 << 20, 4096, mode, false)
                .await
                .expect("zero");
            b.trim((1 << 20) + 4096, 4096, false).await.expect("trim");
            b.read(1 << 20, &mut buf).await.expect("read");
            assert!(buf.iter().all(|&x| x == 0));
            ext.clear();
            b.extents(0, 4 << 20, 1, &mut ext).await.expect("extents");
            assert_eq!(ext.len(), 1);
        });
    }

    #[test]
    fn read_only_open_refuses_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(FileBackend::open(dir.path(), true).is_err());
    }
}
