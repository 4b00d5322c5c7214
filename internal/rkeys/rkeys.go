// Package rkeys names every Redis key and Pub/Sub channel sluice writes: the
// one place to read the key schema (docs/architecture.md describes each
// family) and the one place to change it. Every name starts with "sluice:";
// asynq's own keys start with "asynq:" and are asynq's.
//
// Names are built from tenant names (no ':'), model group names
// ([a-z0-9_-]), job ids (letters and digits) and user ids (any text:
// where a user id is followed by more of the name, its length goes first,
// or it comes last).
package rkeys

import "strconv"

// Prefix starts every key and channel sluice owns.
const Prefix = "sluice:"

// Jobs: one record (hash) per job, its event log (stream) and its
// followers (sorted set of follower leases).
const (
	// JobPrefix + id is a job's record; the scripts build the other job
	// keys from it.
	JobPrefix = Prefix + "job:"
	// JobChannelPrefix + id is the Pub/Sub channel of a job's live events.
	JobChannelPrefix = Prefix + "jobev:"
)

// Job is a job's record (hash).
func Job(id string) string { return JobPrefix + id }

// JobEvents is a job's event log (stream).
func JobEvents(id string) string { return JobPrefix + id + ":events" }

// JobFollowers is the leases of the api processes following a job (sorted
// set: process → lease end).
func JobFollowers(id string) string { return JobPrefix + id + ":follow" }

// JobChannel is the Pub/Sub channel of a job's live events.
func JobChannel(id string) string { return JobChannelPrefix + id }

// TokenSecret is the secret job tokens are derived from (string).
const TokenSecret = Prefix + "token_secret"

// Tenants and users.

// UserPrefix starts every per-user key.
const UserPrefix = Prefix + "user:"

// UserCounts is a user's queued and running job counts (hash).
func UserCounts(tenant, user string) string { return UserPrefix + tenant + ":" + user + ":counts" }

// UserJobs is a user's jobs by creation time (sorted set).
func UserJobs(tenant, user string) string { return UserPrefix + tenant + ":" + user + ":jobs" }

// TenantJobs is a tenant's jobs by creation time (sorted set).
func TenantJobs(tenant string) string { return Prefix + "tenant:" + tenant + ":jobs" }

// Quota is a user's hourly quota buckets (hash: r, t, ts).
func Quota(tenant, user string) string { return Prefix + "quota:" + tenant + ":" + user }

// Idempotency is an Idempotency-Key's job (string "id|body hash").
func Idempotency(tenant, user, key string) string {
	return Prefix + "idem:" + tenant + ":" + strconv.Itoa(len(user)) + ":" + user + ":" + key
}

// NoIdempotency stands in for Idempotency when a request has no key (a
// script's key list is fixed; this key is never written).
const NoIdempotency = Prefix + "idem:none"

// Usage is a tenant's usage statistics of one hour ("h", 2006010215) or
// day ("d", 20060102) (hash).
func Usage(tenant, period, stamp string) string {
	return Prefix + "usage:" + tenant + ":" + period + ":" + stamp
}

// EstimateRatios is the per-model calibration of the input estimate (hash:
// model → ratio).
const EstimateRatios = Prefix + "estimate:ratio"

// Model groups: the engine's state of each group.

// FQ is a key of group g's fair queue: order, delayed, delayed_tags,
// vtime, finish, costs, totals, seq, dispatching, deadlines, expiring,
// dispatch_seq, rate, users.
func FQ(g, name string) string { return Prefix + "fq:" + g + ":" + name }

// WaitingUsers is group g's users with queued jobs (hash: user key → how many).
func WaitingUsers(g string) string { return FQ(g, "users") }

// Limiter is group g's limiter state (hash).
func Limiter(g string) string { return Prefix + "lim:" + g }

// Reservations is group g's open limiter reservations (hash: job id → cost).
func Reservations(g string) string { return Limiter(g) + ":res" }

// Leases is group g's concurrency leases (sorted set: job id → lease end).
func Leases(g string) string { return Limiter(g) + ":leases" }

// HeadersSeen is the last rate-limit headers group g's upstream sent (hash).
func HeadersSeen(g string) string { return Limiter(g) + ":seen" }

// Live is group g's jobs admitted and not ended (hash: id → status initial
// and user key), the safety net of the dispatch round's sweep.
func Live(g string) string { return Prefix + "live:" + g }

// Cache is group g's prompt-cache state (hash: prefix → cached until, n:
// and w: entries).
func Cache(g string) string { return Prefix + "cache:" + g }

// Channels.

// Wake is where group g's dispatchers are woken (arrivals, settlements,
// cache writes).
func Wake(g string) string { return Prefix + "wake:" + g }

// Moved is where group g's queue announces that jobs entered or left it.
func Moved(g string) string { return Prefix + "moved:" + g }

// Cancel is where canceled running jobs are announced to the workers.
const Cancel = Prefix + "cancel"
