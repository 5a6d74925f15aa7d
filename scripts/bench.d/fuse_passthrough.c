/*
 * The limit of a FUSE server: one host file served as MOUNTPOINT/disk, with nothing between
 * the kernel's requests and the file but libfuse's low-level API.
 *
 *   fuse_passthrough IMAGE MOUNTPOINT      (runs in the foreground; unmount to stop it)
 *
 * Built by scripts/bench (gcc, libfuse3-dev, pkg-config from scripts/setup) and measured as
 * the "limit" peer: whatever blkfs spends per request beyond this is its own cost. Like
 * blkfs it serves the file with direct_io (every read reaches the server) and 1 MiB
 * requests; unlike blkfs it runs libfuse's multi-threaded loop, reads with splice from the
 * image straight into the reply, and does nothing else (no checks, no statistics, no
 * formats).
 */
#define FUSE_USE_VERSION 312
#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define DISK_INO 2
#define DISK_NAME "disk"
#define MAX_REQUEST (1 << 20)

static int image_fd = -1;

static void disk_stat(struct stat *st)
{
    struct stat host;

    memset(st, 0, sizeof(*st));
    fstat(image_fd, &host);
    st->st_ino = DISK_INO;
    st->st_mode = S_IFREG | 0644;
    st->st_nlink = 1;
    st->st_size = host.st_size;
    st->st_blksize = MAX_REQUEST;
    st->st_blocks = host.st_blocks;
}

static void root_stat(struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = FUSE_ROOT_ID;
    st->st_mode = S_IFDIR | 0755;
    st->st_nlink = 2;
}

static void pt_init(void *userdata, struct fuse_conn_info *conn)
{
    (void)userdata;
    conn->max_write = MAX_REQUEST;      /* with it, reads of up to 1 MiB (max_pages) */
    conn->max_readahead = MAX_REQUEST;
    if (conn->capable & FUSE_CAP_SPLICE_WRITE)
        conn->want |= FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE;
}

static void pt_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fuse_entry_param e;

    if (parent != FUSE_ROOT_ID || strcmp(name, DISK_NAME) != 0) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    memset(&e, 0, sizeof(e));
    e.ino = DISK_INO;
    e.attr_timeout = 1.0;
    e.entry_timeout = 1.0;
    disk_stat(&e.attr);
    fuse_reply_entry(req, &e);
}

static void pt_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct stat st;

    (void)fi;
    if (ino == FUSE_ROOT_ID)
        root_stat(&st);
    else if (ino == DISK_INO)
        disk_stat(&st);
    else {
        fuse_reply_err(req, ENOENT);
        return;
    }
    fuse_reply_attr(req, &st, 1.0);
}

static void pt_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                       struct fuse_file_info *fi)
{
    (void)attr;
    (void)to_set;  /* a disk is never truncated (O_TRUNC of dd and fio): as blkfs */
    pt_getattr(req, ino, fi);
}

static void pt_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (ino != DISK_INO) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    fi->direct_io = 1;
    fuse_reply_open(req, fi);
}

static void pt_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    struct fuse_bufvec buf = FUSE_BUFVEC_INIT(size);

    (void)ino;
    (void)fi;
    buf.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
    buf.buf[0].fd = image_fd;
    buf.buf[0].pos = off;
    fuse_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
}

static void pt_write_buf(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *in, off_t off,
                         struct fuse_file_info *fi)
{
    struct fuse_bufvec out = FUSE_BUFVEC_INIT(fuse_buf_size(in));
    ssize_t done;

    (void)ino;
    (void)fi;
    out.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
    out.buf[0].fd = image_fd;
    out.buf[0].pos = off;
    done = fuse_buf_copy(&out, in, 0);
    if (done < 0)
        fuse_reply_err(req, (int)-done);
    else
        fuse_reply_write(req, (size_t)done);
}

static void pt_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    (void)fi;
    fuse_reply_err(req, 0);
}

static void pt_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    (void)ino;
    (void)datasync;
    (void)fi;
    fuse_reply_err(req, fdatasync(image_fd) ? errno : 0);
}

static void pt_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    char buf[512];
    size_t used = 0;
    struct stat st;

    (void)fi;
    if (ino != FUSE_ROOT_ID) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    if (size > sizeof(buf))
        size = sizeof(buf);
    if (off < 1) {
        root_stat(&st);
        used += fuse_add_direntry(req, buf + used, size - used, ".", &st, 1);
    }
    if (off < 2) {
        disk_stat(&st);
        used += fuse_add_direntry(req, buf + used, size - used, DISK_NAME, &st, 2);
    }
    fuse_reply_buf(req, buf, used);
}

static const struct fuse_lowlevel_ops ops = {
    .init = pt_init,
    .lookup = pt_lookup,
    .getattr = pt_getattr,
    .setattr = pt_setattr,
    .open = pt_open,
    .read = pt_read,
    .write_buf = pt_write_buf,
    .flush = pt_flush,
    .fsync = pt_fsync,
    .readdir = pt_readdir,
};

int main(int argc, char *argv[])
{
    char *fuse_argv[] = {argv[0], "-o", "fsname=fuse_passthrough,default_permissions", NULL};
    struct fuse_args args = FUSE_ARGS_INIT(3, fuse_argv);
    struct fuse_session *se;
    struct fuse_loop_config *config;
    int ret = 1;

    if (argc != 3) {
        fprintf(stderr, "usage: %s IMAGE MOUNTPOINT\n", argv[0]);
        return 2;
    }
    image_fd = open(argv[1], O_RDWR);
    if (image_fd < 0) {
        perror(argv[1]);
        return 1;
    }
    se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
    if (se == NULL)
        return 1;
    if (fuse_set_signal_handlers(se) == 0) {
        if (fuse_session_mount(se, argv[2]) == 0) {
            config = fuse_loop_cfg_create();
            fuse_loop_cfg_set_clone_fd(config, 0);
            fuse_loop_cfg_set_idle_threads(config, 10);
            ret = fuse_session_loop_mt(se, config);
            fuse_loop_cfg_destroy(config);
            fuse_session_unmount(se);
        }
        fuse_remove_signal_handlers(se);
    }
    fuse_session_destroy(se);
    close(image_fd);
    return ret ? 1 : 0;
}
