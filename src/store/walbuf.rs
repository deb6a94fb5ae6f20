//! A VFS shim for the writer's connection: a commit's WAL frames reach the file
//! in one `pwrite` instead of two per frame.
//!
//! SQLite writes each WAL frame as a 24-byte header and a page, each with its own
//! `write` call; a group commit of ~25 pages cost ~50 system calls and was a
//! quarter of the writer thread's time. This shim sits on top of the default
//! (unix) VFS and, for the WAL file only, gathers frames appended back to back in
//! memory and writes them together when the transaction's last page arrives.
//!
//! What keeps it exactly as safe as the plain VFS:
//! - Every frame is in the file before SQLite makes the commit visible: the
//!   commit frame's page triggers the write, and its error is returned to SQLite
//!   from that same `xWrite`, so a failed write fails the COMMIT as before.
//!   SQLite publishes a commit in the wal-index only after `walFrames` returns.
//! - Anything that is not a plain append (the WAL header, pages rewritten in
//!   place, checksums rewritten after a spill, a commit frame not preceded by
//!   the transaction's other frames) writes what is gathered first and then goes
//!   straight through. So does every read, sync, truncate and size query.
//! - As a last line, the database file's `xShmBarrier`, which SQLite calls
//!   between the two copies of the wal-index header when publishing a commit,
//!   writes anything still gathered (never needed by the rules above).
//! - Durability does not change: the syncer `fdatasync`s the WAL after COMMIT
//!   returns, and by then every frame has been written.
//!
//! Only the writer's connection opens files through this VFS; readers and the
//! checkpointer use the default one and see the same files.

use std::ffi::{c_int, c_void, CStr};
use std::ptr;
use std::sync::{Mutex, OnceLock};

use rusqlite::ffi;

/// Name under which the shim is registered (not as the default VFS).
pub const NAME: &str = "ordersync-walbuf";
const NAME_C: &CStr = c"ordersync-walbuf";

/// At most this much is gathered; a larger transaction writes in pieces. The
/// unix VFS writes at most 128 KiB - 1 bytes per call (`seekAndWriteFd` masks
/// the length with 0x1ffff), so one gathered write must stay below that.
const CAP: usize = 0x1f000;
/// A WAL frame header (salt, page number, commit size, checksums).
const FRAME_HEADER: usize = 24;

/// Registers the shim once; returns the name to open connections with.
pub fn register() -> Result<&'static str, String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| unsafe {
            let real = ffi::sqlite3_vfs_find(ptr::null());
            if real.is_null() {
                return Err("SQLite has no default VFS".into());
            }
            let rf = &*real;
            // Everything but xOpen goes to the real VFS unchanged (its
            // functions read nothing of the struct we copy besides pAppData).
            let vfs = Box::leak(Box::new(ffi::sqlite3_vfs {
                szOsFile: (std::mem::size_of::<File>() as c_int) + rf.szOsFile,
                pNext: ptr::null_mut(),
                zName: NAME_C.as_ptr(),
                xOpen: Some(x_open),
                ..*rf
            }));
            REAL.store(real, std::sync::atomic::Ordering::Release);
            match ffi::sqlite3_vfs_register(vfs, 0) {
                ffi::SQLITE_OK => Ok(()),
                rc => Err(format!("registering the WAL VFS failed (SQLite code {rc})")),
            }
        })
        .clone()
        .map(|()| NAME)
}

static REAL: std::sync::atomic::AtomicPtr<ffi::sqlite3_vfs> =
    std::sync::atomic::AtomicPtr::new(ptr::null_mut());

/// Open main database files, by the address of their name, so a WAL file can
/// find its database's handle (SQLite derives the WAL's name from the same
/// allocation, and `sqlite3_filename_database` returns that address).
static MAINS: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

enum Kind {
    Main {
        name: usize,
        /// The open WAL file of this database on the same connection, if any.
        wal: *mut File,
    },
    Wal {
        main: *mut File,
        gathered: Gathered,
    },
    Other,
}

/// Frames of the WAL waiting to be written.
#[derive(Default)]
struct Gathered {
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    start: i64,
    /// The last write was a commit frame's header: its page ends the commit.
    commit_next: bool,
}

/// Our file handle; the real VFS's handle follows it in the same allocation.
#[repr(C)]
struct File {
    base: ffi::sqlite3_file,
    real: *mut ffi::sqlite3_file,
    kind: Kind,
}

unsafe fn real_methods(f: *mut File) -> &'static ffi::sqlite3_io_methods {
    &*(*(*f).real).pMethods
}

unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let real_vfs = REAL.load(std::sync::atomic::Ordering::Acquire);
    let f = file as *mut File;
    let real = (f as *mut u8).add(std::mem::size_of::<File>()) as *mut ffi::sqlite3_file;
    (*real).pMethods = ptr::null();
    let rc = ((*real_vfs).xOpen.expect("the default VFS opens files"))(
        real_vfs, name, real, flags, out_flags,
    );
    if rc != ffi::SQLITE_OK || (*real).pMethods.is_null() {
        // SQLite closes a file whose xOpen failed only if pMethods is set: close
        // the real one here, and leave ours unset.
        if let Some(close) = (*real).pMethods.as_ref().and_then(|m| m.xClose) {
            close(real);
        }
        (*file).pMethods = ptr::null();
        return if rc == ffi::SQLITE_OK {
            ffi::SQLITE_CANTOPEN
        } else {
            rc
        };
    }
    let kind = if flags & ffi::SQLITE_OPEN_MAIN_DB != 0 && !name.is_null() {
        Kind::Main {
            name: name as usize,
            wal: ptr::null_mut(),
        }
    } else if flags & ffi::SQLITE_OPEN_WAL != 0 && !name.is_null() {
        Kind::Wal {
            main: ptr::null_mut(),
            gathered: Gathered::default(),
        }
    } else {
        Kind::Other
    };
    ptr::write(
        f,
        File {
            base: ffi::sqlite3_file { pMethods: &METHODS },
            real,
            kind,
        },
    );
    let mut mains = MAINS.lock().unwrap_or_else(|p| p.into_inner());
    match &mut (*f).kind {
        Kind::Main { name, .. } => mains.push((*name, f as usize)),
        Kind::Wal { main, .. } => {
            let db = ffi::sqlite3_filename_database(name) as usize;
            if let Some(&(_, m)) = mains.iter().find(|(n, _)| *n == db) {
                *main = m as *mut File;
                if let Kind::Main { wal, .. } = &mut (*(m as *mut File)).kind {
                    *wal = f;
                }
            }
        }
        Kind::Other => {}
    }
    ffi::SQLITE_OK
}

/// The WAL frames gathered on `f`, if it is a WAL file.
unsafe fn gathered<'a>(f: *mut File) -> Option<&'a mut Gathered> {
    match &mut (*f).kind {
        Kind::Wal { gathered, .. } => Some(gathered),
        _ => None,
    }
}

/// Writes what is gathered (a no-op for other files or an empty buffer).
unsafe fn flush(f: *mut File) -> c_int {
    let Some(g) = gathered(f) else {
        return ffi::SQLITE_OK;
    };
    g.commit_next = false;
    if g.buf.is_empty() {
        return ffi::SQLITE_OK;
    }
    let rc = (real_methods(f).xWrite.expect("files can be written"))(
        (*f).real,
        g.buf.as_ptr() as *const c_void,
        g.buf.len() as c_int,
        g.start,
    );
    g.buf.clear();
    rc
}

unsafe extern "C" fn x_write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amt: c_int,
    off: i64,
) -> c_int {
    let f = file as *mut File;
    if let Kind::Wal { main, .. } = &(*f).kind {
        if !main.is_null() && !data.is_null() && amt > 0 {
            let bytes = std::slice::from_raw_parts(data as *const u8, amt as usize);
            match gather(f, bytes, off) {
                Appended::Kept => return ffi::SQLITE_OK,
                Appended::EndsCommit => return flush(f),
                Appended::Not => {
                    let rc = flush(f);
                    if rc != ffi::SQLITE_OK {
                        return rc;
                    }
                    if start_gathering(f, bytes, off) {
                        return ffi::SQLITE_OK;
                    }
                }
            }
        }
    }
    (real_methods(f).xWrite.expect("files can be written"))((*f).real, data, amt, off)
}

enum Appended {
    /// Appended; more of the transaction follows.
    Kept,
    /// Appended, and it was the commit frame's page: write everything now.
    EndsCommit,
    /// Not an append to what is gathered.
    Not,
}

/// Whether a write is a frame header, and whether of a commit frame (bytes 4..8
/// of a header are the database size after a commit, 0 otherwise). Offsets
/// below 32 are the WAL's own header.
fn frame_header(bytes: &[u8], off: i64) -> Option<bool> {
    (bytes.len() == FRAME_HEADER && off >= 32).then(|| bytes[4..8] != [0; 4])
}

/// Appends `bytes` when they continue what is gathered.
unsafe fn gather(f: *mut File, bytes: &[u8], off: i64) -> Appended {
    let Some(g) = gathered(f) else {
        return Appended::Not;
    };
    let appends = !g.buf.is_empty()
        && off == g.start + g.buf.len() as i64
        && g.buf.len() + bytes.len() <= CAP;
    if !appends {
        return Appended::Not;
    }
    g.buf.extend_from_slice(bytes);
    if g.commit_next {
        return Appended::EndsCommit;
    }
    g.commit_next = frame_header(bytes, off) == Some(true);
    Appended::Kept
}

/// Starts gathering at a frame header that does not end a transaction; anything
/// else (the WAL header, a page rewritten in place, a rewritten or lone commit
/// header) goes straight to the file.
unsafe fn start_gathering(f: *mut File, bytes: &[u8], off: i64) -> bool {
    let Some(g) = gathered(f) else {
        return false;
    };
    if frame_header(bytes, off) != Some(false) {
        return false;
    }
    g.start = off;
    g.buf.extend_from_slice(bytes);
    true
}

unsafe extern "C" fn x_close(file: *mut ffi::sqlite3_file) -> c_int {
    let f = file as *mut File;
    let flushed = flush(f);
    {
        let mut mains = MAINS.lock().unwrap_or_else(|p| p.into_inner());
        match &(*f).kind {
            Kind::Main { wal, .. } => {
                mains.retain(|&(_, m)| m != f as usize);
                if !wal.is_null() {
                    if let Kind::Wal { main, .. } = &mut (**wal).kind {
                        *main = ptr::null_mut();
                    }
                }
            }
            Kind::Wal { main, .. } => {
                if !main.is_null() {
                    if let Kind::Main { wal, .. } = &mut (**main).kind {
                        *wal = ptr::null_mut();
                    }
                }
            }
            Kind::Other => {}
        }
    }
    let real = (*f).real;
    let close = real_methods(f).xClose;
    ptr::drop_in_place(f);
    (*file).pMethods = ptr::null();
    let rc = close.map_or(ffi::SQLITE_OK, |c| c(real));
    if flushed != ffi::SQLITE_OK {
        flushed
    } else {
        rc
    }
}

/// Forwards a method after writing what is gathered (the read, sync, size …
/// must see every byte written so far).
macro_rules! flushed {
    ($name:ident, $method:ident ( $($arg:ident : $ty:ty),* )) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file, $($arg: $ty),*) -> c_int {
            let f = file as *mut File;
            let rc = flush(f);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
            match real_methods(f).$method {
                Some(m) => m((*f).real, $($arg),*),
                None => ffi::SQLITE_IOERR,
            }
        }
    };
}

/// Forwards a method unchanged.
macro_rules! forward {
    ($name:ident, $method:ident ( $($arg:ident : $ty:ty),* ), $missing:expr) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file, $($arg: $ty),*) -> c_int {
            let f = file as *mut File;
            match real_methods(f).$method {
                Some(m) => m((*f).real, $($arg),*),
                None => $missing,
            }
        }
    };
}

flushed!(x_read, xRead(data: *mut c_void, amt: c_int, off: i64));
flushed!(x_truncate, xTruncate(size: i64));
flushed!(x_sync, xSync(flags: c_int));
flushed!(x_file_size, xFileSize(size: *mut i64));
flushed!(x_file_control, xFileControl(op: c_int, arg: *mut c_void));
forward!(x_lock, xLock(level: c_int), ffi::SQLITE_IOERR);
forward!(x_unlock, xUnlock(level: c_int), ffi::SQLITE_IOERR);
forward!(x_check_reserved_lock, xCheckReservedLock(out: *mut c_int), ffi::SQLITE_IOERR);
forward!(x_sector_size, xSectorSize(), 4096);
forward!(x_device_characteristics, xDeviceCharacteristics(), 0);
forward!(x_shm_map, xShmMap(page: c_int, size: c_int, extend: c_int, out: *mut *mut c_void), ffi::SQLITE_IOERR);
forward!(x_shm_lock, xShmLock(offset: c_int, n: c_int, flags: c_int), ffi::SQLITE_IOERR);
forward!(x_shm_unmap, xShmUnmap(delete: c_int), ffi::SQLITE_OK);
forward!(x_fetch, xFetch(off: i64, amt: c_int, out: *mut *mut c_void), {
    let _ = (off, amt);
    *out = ptr::null_mut();
    ffi::SQLITE_OK
});
forward!(x_unfetch, xUnfetch(off: i64, page: *mut c_void), {
    let _ = (off, page);
    ffi::SQLITE_OK
});

/// SQLite calls this on the database file between writing the two copies of
/// the wal-index header, i.e. just before a commit becomes visible. The write
/// rules above leave nothing gathered by then; this is the backstop.
unsafe extern "C" fn x_shm_barrier(file: *mut ffi::sqlite3_file) {
    let f = file as *mut File;
    if let Kind::Main { wal, .. } = &(*f).kind {
        if !wal.is_null() {
            let _ = flush(*wal);
        }
    }
    if let Some(m) = real_methods(f).xShmBarrier {
        m((*f).real);
    }
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: Some(x_fetch),
    xUnfetch: Some(x_unfetch),
};

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rusqlite::{Connection, OpenFlags};

    /// A writer through the shim, with a page cache small enough that large
    /// transactions spill to the WAL before COMMIT and pages get rewritten in
    /// place (SQLite then rewrites frame checksums at commit).
    fn writer(path: &Path) -> Connection {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE;
        let conn =
            Connection::open_with_flags_and_vfs(path, flags, super::register().unwrap()).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA cache_size = 20;
             PRAGMA wal_autocheckpoint = 0;
             CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT, v BLOB);
             CREATE INDEX t_k ON t(k);",
        )
        .unwrap();
        conn
    }

    fn insert(w: &Connection, rows: i64, seed: i64) {
        let mut stmt = w
            .prepare_cached("INSERT INTO t (k, v) VALUES (?1, randomblob(300))")
            .unwrap();
        for j in 0..rows {
            stmt.execute([format!("k{}", (seed * 7919 + j * 104_729) % 100_000)])
                .unwrap();
        }
    }

    fn count(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    /// Opens a copy of the database and its WAL as they are on disk now: SQLite
    /// recovers the WAL from the file alone, checking every frame's checksum.
    fn recovered_copy(db: &Path, dir: &Path) -> Connection {
        let copy = dir.join(format!("copy-{}.db", count_files(dir)));
        std::fs::copy(db, &copy).unwrap();
        std::fs::copy(db.with_extension("db-wal"), copy.with_extension("db-wal")).unwrap();
        let conn = Connection::open(&copy).unwrap();
        let ok: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
        conn
    }

    fn count_files(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn every_commit_is_in_the_file_before_other_connections_see_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("w.db");
        let w = writer(&db);
        let reader = Connection::open(&db).unwrap();
        let mut expected = 0;
        // One row (a lone commit frame), a few (one gathered write), 600 rows of
        // 300 bytes (far more than one 124 KiB write, and spilling the cache).
        for (i, rows) in [1, 10, 600, 3, 1, 600, 40].into_iter().enumerate() {
            w.execute_batch("BEGIN IMMEDIATE").unwrap();
            insert(&w, rows, i as i64);
            w.execute_batch("COMMIT").unwrap();
            expected += rows;
            // A reader on the default VFS reads the new frames from the file.
            assert_eq!(count(&reader), expected, "after commit {i}");
            // So does crash recovery from a copy of the files.
            assert_eq!(count(&recovered_copy(&db, dir.path())), expected);
        }
    }

    /// Set in the child process of the test below: the directory to work in.
    const EFBIG_CHILD: &str = "ORDERSYNC_WALBUF_EFBIG_CHILD";

    /// In a child process whose files may not grow past 1 MiB (RLIMIT_FSIZE,
    /// SIGXFSZ ignored, so a write past it fails with EFBIG), commits until the
    /// WAL write fails. The failing COMMIT must report the error, and neither
    /// another connection nor crash recovery may see any of that transaction.
    #[test]
    fn a_failed_wal_write_fails_the_commit_and_nothing_of_it_is_seen() {
        if let Some(dir) = std::env::var_os(EFBIG_CHILD) {
            return efbig_child(Path::new(&dir));
        }
        let dir = tempfile::tempdir().unwrap();
        let name =
            "store::walbuf::tests::a_failed_wal_write_fails_the_commit_and_nothing_of_it_is_seen";
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(EFBIG_CHILD, dir.path())
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child failed:\n{log}");
        assert!(
            log.contains("1 passed"),
            "the child did not run the test:\n{log}"
        );
        let committed: i64 = std::fs::read_to_string(dir.path().join("committed"))
            .unwrap()
            .parse()
            .unwrap();
        assert!(committed > 0);
        // The child closed its connections, which checkpointed the WAL.
        let conn = Connection::open(dir.path().join("w.db")).unwrap();
        let ok: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
        assert_eq!(count(&conn), committed);
    }

    fn efbig_child(dir: &Path) {
        let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim), 0);
            lim.rlim_cur = 1 << 20;
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
        }
        let db = dir.join("w.db");
        let w = writer(&db);
        let reader = Connection::open(&db).unwrap();
        let mut committed = 0;
        for i in 0..10_000 {
            w.execute_batch("BEGIN IMMEDIATE").unwrap();
            insert(&w, 20, i);
            match w.execute_batch("COMMIT") {
                Ok(()) => committed += 20,
                Err(e) => {
                    let code = e.sqlite_error_code();
                    assert!(
                        matches!(
                            code,
                            Some(rusqlite::ErrorCode::SystemIoFailure)
                                | Some(rusqlite::ErrorCode::DiskFull)
                        ),
                        "{e:?}"
                    );
                    break;
                }
            }
            assert!(i < 9_999, "the WAL never hit the 1 MiB limit");
        }
        if !w.is_autocommit() {
            w.execute_batch("ROLLBACK").unwrap();
        }
        assert_eq!(count(&reader), committed);
        assert_eq!(count(&w), committed);
        // Files may grow again (the soft limit goes back to the hard one), so a
        // copy of the files as they are now can be recovered.
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) }, 0);
        assert_eq!(count(&recovered_copy(&db, dir)), committed);
        std::fs::write(dir.join("committed"), committed.to_string()).unwrap();
    }

    #[test]
    fn rolled_back_work_leaves_committed_data_intact() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("w.db");
        let w = writer(&db);
        w.execute_batch("BEGIN IMMEDIATE").unwrap();
        insert(&w, 50, 1);
        w.execute_batch("COMMIT").unwrap();
        // A transaction that spilled frames to the WAL, then rolled back.
        w.execute_batch("BEGIN IMMEDIATE").unwrap();
        insert(&w, 600, 2);
        w.execute_batch("ROLLBACK").unwrap();
        // A savepoint rolled back inside a committed transaction.
        w.execute_batch("BEGIN IMMEDIATE; SAVEPOINT job").unwrap();
        insert(&w, 300, 3);
        w.execute_batch("ROLLBACK TO job; RELEASE job").unwrap();
        insert(&w, 5, 4);
        w.execute_batch("COMMIT").unwrap();
        let reader = Connection::open(&db).unwrap();
        assert_eq!(count(&reader), 55);
        assert_eq!(count(&recovered_copy(&db, dir.path())), 55);
        // And a checkpoint through the shim copies it all into the database.
        w.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        assert_eq!(count(&reader), 55);
    }
}
