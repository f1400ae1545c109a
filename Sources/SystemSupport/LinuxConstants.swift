internal import CSystem

/// Values Swift's Glibc module hides (it is built without _GNU_SOURCE), taken from glibc's and
/// Linux's headers through CSystem.
public enum LinuxConstants {
    /// `fcntl` command for a record lock owned by the open file description, not the process:
    /// it survives other descriptors of the file closing, and dies with the description.
    public static var openFileDescriptionSetLock: Int32 { CSystem_F_OFD_SETLK }
    /// `posix_spawnattr_setflags` flag: the child starts a new session.
    public static var spawnNewSession: Int32 { CSystem_POSIX_SPAWN_SETSID }
    /// `open` flag: reads bypass the page cache.
    public static var directIO: Int32 { CSystem_O_DIRECT }
}
