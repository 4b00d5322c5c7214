// Package rkeys names every Redis key and Pub/Sub channel sluice writes: the
// one place to read the key schema (docs/architecture.md describes each
// family) and the one place to change it. Every name starts with "sluice:";
// asynq's own keys start with "asynq:" and are asynq's.
//
// Slots. Every script sluice runs touches the keys of one model group only:
// the group's engine (fair queue, limiter, leases, cache state), the
// records and event logs of the group's jobs, and the per-user state that
// admission and a job's steps change with them (counts, Idempotency-Keys,
// the listing indexes, the usage statistics). All those
// keys carry the group's hash tag, "{" + Tag(group) + "}", so that in Redis
// Cluster they share one hash slot and every script stays one atomic step.
// A job id starts with its group's tag ("job_" + tag + random), so a job's
// keys are found from its id alone (Job). Readers that span groups (a
// user's list of jobs, a tenant's usage) read each group's keys and merge.
// Keys outside any group (the token secret, the estimate calibration) are
// read and written one at a time. A user's hourly quotas and dollar
// budgets serve every group: they live in the user's own slot (UserTag),
// a tenant's budgets in the tenant's (TenantTag), each changed by a script
// of its own.
//
// Names are built from tenant names (no ':'), model group names
// ([a-z0-9_-]), job ids (letters and digits) and user ids (any text:
// where a user id is followed by more of the name, its length goes first,
// or it comes last).
package rkeys

import (
	"crypto/sha256"
	"encoding/base32"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// Prefix starts every key and channel sluice owns.
const Prefix = "sluice:"

// TagLen is the length of a group's tag, the characters of a job id after
// "job_" that name its group's slot.
const TagLen = 3

var b32 = base32.StdEncoding.WithPadding(base32.NoPadding)

// Tag is model group g's hash tag: the first TagLen characters of the
// base32 SHA-256 of its name, lower case (the alphabet of job ids). Two
// groups may share a tag; they then share a slot, which costs nothing.
func Tag(g string) string {
	if t, ok := tags.Load(g); ok {
		return t.(string)
	}
	t := hash32(g, TagLen)
	if ntags.Add(1) <= maxTags {
		tags.Store(g, t)
	}
	return t
}

// tags remembers the tags of model groups (every key of a group carries
// its tag, so a job's admission would hash the group's name a dozen
// times); a group is named in the configuration, so there are few, and
// past maxTags names the rest are hashed each time.
var (
	tags  sync.Map
	ntags atomic.Int64
)

const maxTags = 4096

// hash32 is the first n characters of the lower-case base32 SHA-256 of s.
func hash32(s string, n int) string {
	sum := sha256.Sum256([]byte(s))
	return strings.ToLower(b32.EncodeToString(sum[:]))[:n]
}

// JobTag is the tag a job id carries: the TagLen characters after "job_"
// ("" for a string too short to be a job id).
func JobTag(id string) string {
	if len(id) < 4+TagLen {
		return ""
	}
	return id[4 : 4+TagLen]
}

// slot starts every key in the slot of tag.
func slot(tag string) string { return Prefix + "{" + tag + "}:" }

// group starts every key of model group g.
func group(g string) string { return slot(Tag(g)) }

// Jobs: one record (hash) per job, its event log (stream) and its
// followers (sorted set of follower leases), in its group's slot.

// Job is a job's record (hash): Prefix + "{" + JobTag(id) + "}:job:" + id.
// The dispatch script builds the same name from an id (lua/dispatch.lua's
// jkey): the two must agree.
func Job(id string) string { return slot(JobTag(id)) + "job:" + id }

// JobEvents is a job's event log (stream).
func JobEvents(id string) string { return Job(id) + ":events" }

// JobFollowers is the leases of the api processes following a job (sorted
// set: process → lease end).
func JobFollowers(id string) string { return Job(id) + ":follow" }

// JobChannelPrefix + id is the Pub/Sub channel of a job's live events.
const JobChannelPrefix = Prefix + "jobev:"

// JobChannel is the Pub/Sub channel of a job's live events.
func JobChannel(id string) string { return JobChannelPrefix + id }

// TokenSecret is the secret job tokens are derived from (string).
const TokenSecret = Prefix + "token_secret"

// Tenants and users, per model group.

// UserPrefix starts every per-user key of group g (the dispatch script
// builds a user's counts key from it).
func UserPrefix(g string) string { return group(g) + "user:" }

// UserCounts is a user's queued and running job counts in group g (hash).
func UserCounts(g, tenant, user string) string {
	return UserPrefix(g) + tenant + ":" + user + ":counts"
}

// UserJobs is a user's jobs of group g by creation time (sorted set).
func UserJobs(g, tenant, user string) string { return UserPrefix(g) + tenant + ":" + user + ":jobs" }

// TenantJobs is a tenant's jobs of group g by creation time (sorted set).
func TenantJobs(g, tenant string) string { return group(g) + "tenant:" + tenant + ":jobs" }

// Quota is a user's hourly quota buckets (hash: r, t, ts), shared by all
// groups, in the user's own slot (UserTag). Charging it in the admission
// script that queues the job would need it in the group's slot; instead a
// script of its own takes and gives back quota (lua/quota.lua), one user's
// slot at a time, so one bucket serves every group.
func Quota(tenant, user string) string {
	return slot(UserTag(tenant, user)) + "quota:" + tenant + ":" + strconv.Itoa(len(user)) + ":" + user
}

// QuotaGiven marks that job id's hold on its user's quota was given back
// (string, expires), beside the user's quota.
func QuotaGiven(tenant, user, id string) string {
	return slot(UserTag(tenant, user)) + "qgiven:" + id
}

// UserBudget is a user's dollar budget counter of one period ("d",
// 20060102, or "m", 200601): µ$ reserved and spent (string), in the user's
// slot.
func UserBudget(tenant, user, period, stamp string) string {
	return slot(UserTag(tenant, user)) + "budget:" + tenant + ":" + strconv.Itoa(len(user)) + ":" + user + ":" + period + ":" + stamp
}

// UserBudgetGiven marks that job id's hold on its user's budgets was
// settled (string, expires).
func UserBudgetGiven(tenant, user, id string) string {
	return slot(UserTag(tenant, user)) + "bgiven:" + id
}

// TenantBudget is a tenant's dollar budget counter of one period, in the
// tenant's own slot (TenantTag).
func TenantBudget(tenant, period, stamp string) string {
	return slot(TenantTag(tenant)) + "budget:" + tenant + ":" + period + ":" + stamp
}

// TenantBudgetGiven marks that job id's hold on its tenant's budgets was
// settled.
func TenantBudgetGiven(tenant, id string) string { return slot(TenantTag(tenant)) + "bgiven:" + id }

// TenantTag is the hash tag of a tenant's own keys: "t", and base32 of
// the SHA-256 of the tenant's name.
func TenantTag(tenant string) string { return "t" + hash32(tenant, 16) }

// UserTag is the hash tag of a user's own keys: "u", and base32 of the
// SHA-256 of tenant and user id (user ids may hold braces).
func UserTag(tenant, user string) string { return "u" + hash32(tenant+"\x00"+user, 16) }

// Idempotency is an Idempotency-Key's job in group g (string "id|body hash").
func Idempotency(g, tenant, user, key string) string {
	return group(g) + "idem:" + tenant + ":" + strconv.Itoa(len(user)) + ":" + user + ":" + key
}

// NoIdempotency stands in for Idempotency when a request has no key (a
// script's key list is fixed; this key is never written).
func NoIdempotency(g string) string { return group(g) + "idem:none" }

// Usage is a tenant's usage statistics in group g of one hour ("h",
// 2006010215) or day ("d", 20060102) (hash). Group "" holds the counts
// not tied to a group's jobs (refusals at admission).
func Usage(g, tenant, period, stamp string) string {
	p := Prefix
	if g != "" {
		p = group(g)
	}
	return p + "usage:" + tenant + ":" + period + ":" + stamp
}

// EstimateRatios is the per-model calibration of the input estimate (hash:
// model → ratio).
const EstimateRatios = Prefix + "estimate:ratio"

// Model groups: the engine's state of each group.

// FQ is a key of group g's fair queue: order, delayed, delayed_tags,
// vtime, vtime_b, finish, costs, totals, seq, dispatching, deadlines, expiring,
// dispatch_seq, rate, users.
func FQ(g, name string) string { return group(g) + "fq:" + g + ":" + name }

// WaitingUsers is group g's users with queued jobs (hash: user key → how many).
func WaitingUsers(g string) string { return FQ(g, "users") }

// Limiter is group g's limiter state (hash).
func Limiter(g string) string { return group(g) + "lim:" + g }

// Reservations is group g's open limiter reservations (hash: job id → cost).
func Reservations(g string) string { return Limiter(g) + ":res" }

// Leases is group g's concurrency leases (sorted set: job id → lease end).
func Leases(g string) string { return Limiter(g) + ":leases" }

// HeadersSeen is the last rate-limit headers group g's upstream sent (hash).
func HeadersSeen(g string) string { return Limiter(g) + ":seen" }

// Live is group g's jobs admitted and not ended (hash: id → status initial
// and user key), the safety net of the dispatch round's sweep.
func Live(g string) string { return group(g) + "live:" + g }

// Cache is group g's prompt-cache state (hash: prefix → cached until, n:
// and w: entries).
func Cache(g string) string { return group(g) + "cache:" + g }

// Channels. Scripts PUBLISH to them; in Redis Cluster a PUBLISH reaches
// the subscribers on every node.

// Wake is where group g's dispatchers are woken (arrivals, settlements,
// cache writes).
func Wake(g string) string { return Prefix + "wake:" + g }

// Moved is where group g's queue announces that jobs entered or left it.
func Moved(g string) string { return Prefix + "moved:" + g }

// Cancel is where canceled running jobs are announced to the workers.
const Cancel = Prefix + "cancel"

// Layout marks a Redis whose sluice keys are in this layout (string,
// LayoutVersion): set by the first process that finds no key of the older
// layout, and by "sluice migrate" once it moved them.
const Layout = Prefix + "layout"

// LayoutVersion is Layout's value for this layout.
const LayoutVersion = "2"
