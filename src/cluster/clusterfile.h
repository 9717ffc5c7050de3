/* clusterfile: cluster operations. The cluster file (one INI file describing the nodes of a strata cluster), the
 * command lines `strata cluster` derives from it, how each process is launched (a plain process on this machine,
 * inside a network namespace on this machine, or over ssh), the state file recording what was started, and the
 * health probes (a worker's INFO over the cluster link, a coordinator's HTTP GET).
 *
 * Contract:
 * - The cluster file. Lines are "[cluster]", "[node NAME]", "key = value", blank, or comments starting with '#' or
 *   ';'. A value runs to the end of the line or to a '#'/';' preceded by white space; a value in double quotes may
 *   hold anything but a newline (escapes \" and \\). Every key is documented in docs/operations.md and below;
 *   unknown sections, unknown keys, repeated keys, bad values and inconsistent settings are errors, and the first
 *   one is reported as "FILE:LINE: message". The reader never reads past len, rejects NUL bytes, lines over
 *   CLUSTERFILE_LINE_MAX bytes and files over CLUSTERFILE_MAX_BYTES.
 * - Launch kinds. A node is started with `ssh = TARGET` (over ssh: the command line is run by the remote shell),
 *   `netns = NS` (`ip netns exec NS ...` on this machine) or `local = yes` (a plain process here); a node whose
 *   address is a loopback address is local unless it says otherwise; any other node must say which, unless
 *   nothing is ever started on it (managed = no and coordinator = no).
 * - Paths (model, secret_file, api_key_file, cache_dir, state_dir) are used as written; relative ones are taken
 *   from the cluster file's directory for processes on this machine (local, netns) and from the login directory
 *   on ssh nodes.
 * - Commands. clusterfile_*_cmd build argv arrays (struct cluster_cmd, strings owned); nothing is run. The ssh
 *   forms quote every word for the remote POSIX shell (cluster_shell_quote) so a value can never become shell
 *   syntax; ssh targets may not start with '-'.
 * - The state file (STATE_DIR/state) is written by `strata cluster` only, atomically (a temporary file renamed
 *   over it); it is read with the same rules as the cluster file and checked just as strictly.
 * - Processes. cluster_proc_spawn starts a process detached (its own session, stdin /dev/null, stdout and stderr
 *   appended to a log) and reports a failed exec as an error. cluster_proc_alive identifies a process by pid and
 *   start time (so a recycled pid is not taken for ours) and reaps it when it is our exited child.
 * - Probes and helpers take a timeout in milliseconds and never block past it. Library code: nothing is printed
 *   to stdout and nothing exits; errors are negative ST_E* codes with a message in err.
 */
#ifndef STRATA_CLUSTERFILE_H
#define STRATA_CLUSTERFILE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cluster/cluster.h"

#define CLUSTERFILE_MAX_BYTES (1u << 20)
#define CLUSTERFILE_LINE_MAX 4096
#define CLUSTERFILE_MAX_NODES CLUSTER_MAX_STAGES
#define CLUSTERFILE_NAME_MAX 63   /* cluster, node and netns names: [A-Za-z0-9._-], 1..63 bytes */
#define CLUSTERFILE_PATH_MAX 1024
#define CLUSTER_CMD_MAX_ARGS 96
#define CLUSTER_DEFAULT_API_PORT 8100

enum clusterfile_launch { CLUSTERFILE_LAUNCH_LOCAL, CLUSTERFILE_LAUNCH_NETNS, CLUSTERFILE_LAUNCH_SSH,
                          CLUSTERFILE_LAUNCH_COUNT };
/* coordinator = no | candidate | yes: "yes" is where `cluster start` puts the coordinator (exactly one node);
 * "candidate" nodes may take the role over (`cluster migrate --to`). */
enum clusterfile_coord { CLUSTERFILE_COORD_NO, CLUSTERFILE_COORD_CANDIDATE, CLUSTERFILE_COORD_YES,
                         CLUSTERFILE_COORD_COUNT };

struct clusterfile_node {
    char name[CLUSTERFILE_NAME_MAX + 1];
    char host[256];                        /* address: how the coordinator and the other stages reach the worker */
    int port;
    char listen_host[256];                 /* what the worker binds (listen = HOST:PORT; default: the address) */
    int listen_port;
    enum clusterfile_launch launch;
    char target[256];                      /* ssh target ([user@]host) or netns name */
    char model[CLUSTERFILE_PATH_MAX];      /* this node's copy of the model ("" none) */
    char device[32];                       /* "" : the cluster's device (else cpu) */
    int threads;                           /* 0: all cores */
    uint64_t max_memory_bytes;             /* 0: what the node reports free */
    char cache_dir[CLUSTERFILE_PATH_MAX];  /* "" : the worker's default */
    char strata[CLUSTERFILE_PATH_MAX];     /* the strata binary on this node ("" : see clusterfile_worker_cmd) */
    char layers[64];                       /* explicit "a-b" ("" : from [cluster] layers or auto) */
    int api_port;                          /* the API port when this node is the coordinator (0: the cluster's) */
    bool worker;                           /* runs a worker (default yes) */
    bool managed;                          /* the worker is started and stopped by strata cluster (default yes);
                                              no: something else runs it (e.g. the strata-worker systemd unit) */
    enum clusterfile_coord coordinator;
    int line;                              /* line of the [node NAME] header */
};

struct clusterfile {
    char path[CLUSTERFILE_PATH_MAX];       /* as given */
    char dir[CLUSTERFILE_PATH_MAX];        /* its directory (relative paths are taken from here) */
    char name[CLUSTERFILE_NAME_MAX + 1];   /* default: the file's base name up to the first '.' */
    char model[CLUSTERFILE_PATH_MAX];      /* the coordinator's model directory (a node's own model wins) */
    char model_name[128];                  /* the name clients use ("" : serve's default) */
    char secret_file[CLUSTERFILE_PATH_MAX];/* shared cluster secret, same path on every host ("" : none) */
    char layers[512];                      /* explicit placement "0-3,4-7" over the workers in file order; "" auto */
    char api_host[256];                    /* coordinator bind address ("" : the coordinator node's host) */
    int api_port;                          /* default CLUSTER_DEFAULT_API_PORT */
    char api_key_file[CLUSTERFILE_PATH_MAX];
    int parallel, ctx;                     /* 0: serve's defaults */
    char device[32];                       /* default device of every worker ("" : cpu) */
    bool send_weights;
    char state_dir[CLUSTERFILE_PATH_MAX];  /* "" : see clusterfile_state_dir */
    char remote_dir[CLUSTERFILE_PATH_MAX]; /* logs on ssh nodes ("" : .local/state/strata/NAME in the login dir) */
    char strata[CLUSTERFILE_PATH_MAX];     /* the strata binary on ssh nodes (default "strata") */
    char log_level[16];                    /* "" : the processes' default */
    int start_timeout_s;                   /* wait for workers and the coordinator (default 600) */
    int stop_timeout_s;                    /* wait after SIGTERM before SIGKILL (default 30) */
    int n_nodes;
    struct clusterfile_node *nodes;        /* [n_nodes], file order */
};

/* Parses text[0..len) (path names the file in messages and gives the base for relative paths). */
int clusterfile_parse(struct clusterfile *cf, const char *text, size_t len, const char *path, char *err);
/* Reads and parses a file. */
int clusterfile_load(struct clusterfile *cf, const char *path, char *err);
/* Frees the nodes; a zeroed struct is fine. */
void clusterfile_free(struct clusterfile *cf);

/* The node named name, or NULL. */
const struct clusterfile_node *clusterfile_node_find(const struct clusterfile *cf, const char *name);
/* The node with coordinator = yes (the parser guarantees there is exactly one). */
const struct clusterfile_node *clusterfile_coordinator(const struct clusterfile *cf);
int clusterfile_n_workers(const struct clusterfile *cf);
/* The state directory: state_dir, else $XDG_STATE_HOME/strata/NAME, else $HOME/.local/state/strata/NAME, else
 * /tmp/strata-cluster-NAME-UID. */
int clusterfile_state_dir(const struct clusterfile *cf, char *out, size_t cap, char *err);
/* A path from the file as seen by a process on node n ("" stays ""). */
int clusterfile_node_path(const struct clusterfile *cf, const struct clusterfile_node *n, const char *path,
                          char *out, size_t cap, char *err);
/* The coordinator's API as clients reach it when node n is the coordinator: host and port. */
void clusterfile_api_address(const struct clusterfile *cf, const struct clusterfile_node *n, char *host,
                             size_t host_cap, int *port);
const char *clusterfile_launch_name(enum clusterfile_launch l);  /* "local", "netns", "ssh" */
int clusterfile_launch_parse(const char *s, enum clusterfile_launch *out);

/* ---- command lines ---- */

struct cluster_cmd {
    int argc;
    char *argv[CLUSTER_CMD_MAX_ARGS + 1];  /* NULL-terminated; strings malloc'd */
    bool failed;                           /* an append failed (out of memory or too many words); sticky */
};
void cluster_cmd_init(struct cluster_cmd *c);
void cluster_cmd_free(struct cluster_cmd *c);
void cluster_cmd_add(struct cluster_cmd *c, const char *word);
void cluster_cmd_addf(struct cluster_cmd *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The words joined by spaces, each shell-quoted when it needs it, into out (truncated with "..."). */
void cluster_cmd_format(const struct cluster_cmd *c, char *out, size_t cap);

/* Writes s as one word for a POSIX shell (as is when it only has safe characters, else in single quotes). Returns
 * ST_ERANGE when it does not fit. */
int cluster_shell_quote(const char *s, char *out, size_t cap);

/* `STRATA worker --listen ... --name NODE ...` for node n. STRATA is the node's strata key, else for ssh nodes
 * the cluster's strata key (default "strata", found through PATH there), else the argument strata (the binary
 * running `strata cluster`, for local and netns nodes). */
int clusterfile_worker_cmd(const struct clusterfile *cf, const struct clusterfile_node *n, const char *strata,
                           struct cluster_cmd *out, char *err);
/* `STRATA serve -m MODEL --host H --port P --coordinator-only --worker ADDR ... [--layers ...]` with node n as
 * the coordinator. */
int clusterfile_coordinator_cmd(const struct clusterfile *cf, const struct clusterfile_node *n, const char *strata,
                                struct cluster_cmd *out, char *err);
/* How to run inner on node n so that it keeps running detached with its output in log:
 *   local: inner itself (the caller spawns it detached);
 *   netns: ip netns exec NS inner...;
 *   ssh:   ssh -o BatchMode=yes -o ConnectTimeout=10 TARGET "sh -c 'mkdir -p DIR && nohup inner... >LOG 2>&1
 *          </dev/null & echo $!'" (prints the remote pid on stdout). */
int clusterfile_launch_cmd(const struct clusterfile *cf, const struct clusterfile_node *n,
                           const struct cluster_cmd *inner, const char *log, struct cluster_cmd *out, char *err);
/* ssh TARGET running the POSIX shell script (quoted as one remote word); for ssh nodes only. */
int cluster_ssh_cmd(const char *target, const char *script, struct cluster_cmd *out, char *err);
/* The remote script that stops pid (SIGTERM, up to timeout_s for it to exit, then SIGKILL) and prints
 * "stopped", "killed" or "gone". When start_time is not 0, a process with another start time is left alone
 * ("gone": the pid was reused). */
int cluster_ssh_stop_script(int pid, uint64_t start_time, int timeout_s, char *out, size_t cap);
/* The remote script that prints "alive" or "gone" for pid (and start_time, when not 0). */
int cluster_ssh_alive_script(int pid, uint64_t start_time, char *out, size_t cap);
/* The log file of a process on node n (role "worker" or "coordinator"): in the state directory for local and
 * netns nodes, in remote_dir for ssh nodes. */
int clusterfile_log_path(const struct clusterfile *cf, const struct clusterfile_node *n, const char *state_dir,
                         const char *role, char *out, size_t cap, char *err);

/* ---- state: what `strata cluster` started ---- */

enum cluster_role { CLUSTER_ROLE_WORKER, CLUSTER_ROLE_COORDINATOR, CLUSTER_ROLE_COUNT };
const char *cluster_role_name(enum cluster_role r); /* "worker", "coordinator" */

struct cluster_proc {
    enum cluster_role role;
    char node[CLUSTERFILE_NAME_MAX + 1];
    int pid;
    uint64_t start_time;                   /* /proc/PID/stat starttime (clock ticks); 0 for ssh processes */
    enum clusterfile_launch launch;
    char target[256];                      /* ssh target or netns name ("" local) */
    char address[300];                     /* HOST:PORT it serves (worker link or HTTP API) */
    char log[CLUSTERFILE_PATH_MAX];        /* on the node */
    int64_t started_unix;                  /* wall clock at start */
};

#define CLUSTER_STATE_MAX_PROCS (CLUSTERFILE_MAX_NODES + 1)
struct cluster_state {
    char cluster[CLUSTERFILE_NAME_MAX + 1];
    int n_procs;
    struct cluster_proc procs[CLUSTER_STATE_MAX_PROCS];
};
/* A missing file gives an empty state and ST_OK. */
int cluster_state_load(struct cluster_state *st, const char *path, char *err);
/* Writes atomically (PATH.tmp renamed over PATH), mode 0600; an empty state removes the file. */
int cluster_state_save(const struct cluster_state *st, const char *path, char *err);
/* Adds (or replaces the entry of the same role and node). ST_ERANGE when full. */
int cluster_state_put(struct cluster_state *st, const struct cluster_proc *p);
void cluster_state_remove(struct cluster_state *st, enum cluster_role role, const char *node);
/* The entry of that role (and node, unless node is NULL), or NULL. */
struct cluster_proc *cluster_state_find(struct cluster_state *st, enum cluster_role role, const char *node);

/* ---- processes on this machine ---- */

/* Starts cmd detached: a new session, stdin /dev/null, stdout and stderr appended to log (created 0644). A
 * binary that cannot be run gives an error naming it. */
int cluster_proc_spawn(const struct cluster_cmd *cmd, const char *log, int *pid, char *err);
/* starttime of pid from /proc/PID/stat; ST_ENOTFOUND when there is no such process. */
int cluster_proc_start_time(int pid, uint64_t *start_time, char *err);
/* Running (not a zombie) and, when start_time is not 0, the same process. Reaps it when it is our child that
 * exited. */
bool cluster_proc_alive(int pid, uint64_t start_time);
/* SIGTERM, then up to timeout_ms for it to go, then SIGKILL (and up to 2 s more). *killed tells whether SIGKILL
 * was needed. ST_OK when it is gone (or was already). */
int cluster_proc_stop(int pid, uint64_t start_time, int timeout_ms, bool *killed, char *err);
/* Runs cmd (not detached) with stdout captured into out (NUL-terminated, truncated to cap) and stderr into
 * err_out (may be NULL); kills it when it runs past timeout_ms (ST_ETIMEDOUT). *status is the exit status
 * (128 + signal when killed by one). */
int cluster_run_capture(const struct cluster_cmd *cmd, int timeout_ms, char *out, size_t cap, char *err_out,
                        size_t err_cap, int *status, char *err);
/* The last non-empty line of file from byte offset on that contains needle (any line when needle is NULL), into
 * out. ST_ENOTFOUND when there is none. Reads at most the last 64 KiB. */
int cluster_log_last_line(const char *file, uint64_t offset, const char *needle, char *out, size_t cap, char *err);

/* ---- probes ---- */

/* Connects to a worker (handshake, with the secret when given), asks for its inventory (INFO_REQ) and closes.
 * *rtt_ms (may be NULL) is the time of the INFO round trip. */
int cluster_probe_worker(const char *host, int port, const void *secret, size_t secret_bytes, int timeout_ms,
                         struct node_info *ni, double *rtt_ms, char *err);
/* HTTP/1.1 GET http://host:port/path (with "Authorization: Bearer KEY" when bearer is not NULL); *body is
 * malloc'd (NUL-terminated, free with free()), at most max_body bytes. */
int cluster_http_get(const char *host, int port, const char *path, const char *bearer, int timeout_ms,
                     size_t max_body, int *status, char **body, size_t *body_len, char *err);
/* Parses a complete HTTP/1.x response (the bytes up to the peer's close): status line, headers, and a body
 * delimited by Content-Length, chunked transfer coding, or the end of the data. *body is malloc'd. */
int cluster_http_parse(const char *resp, size_t len, size_t max_body, int *status, char **body, size_t *body_len,
                       char *err);

#endif
