// Package cachekey finds the prompt-cache breakpoints of an Anthropic Messages
// request and names each cached prefix by a stable hash, so that the scheduler
// can tell which requests share a cached prefix and how many of their input
// tokens the upstream will read from the cache rather than count afresh.
//
// A breakpoint is a content block carrying "cache_control":
// {"type":"ephemeral"} (optionally with "ttl":"5m" or "1h"; absent means 5m).
// Blocks with breakpoints live in tools[] (the tool definition itself), in
// system (when it is an array of blocks; a string system prompt cannot carry
// one) and in messages[].content (when it is an array of blocks). The cached
// prefix runs tools → system → messages, up to and including the marked
// block.
//
// # What the hash covers
//
// Prefix.Hash is the hex SHA-256 of, in order: a version tag; the model
// name; each tool definition; each system block; then, once the prefix
// reaches into messages, the request's tool_choice and thinking settings;
// then each message's role and each of its content blocks — every one up to
// and including the marked block, each framed by a tag and its length so that
// moving a block across a boundary (tool to system, one message to the next)
// changes the hash.
//
//   - tool_choice and thinking belong to the identity of message-level
//     prefixes only: Anthropic documents that changing either invalidates
//     the messages cache but not the tools or system caches.
//   - The model name is hashed as given (an alias and the snapshot it
//     resolves to hash differently).
//   - Nothing else in the request (max_tokens, temperature, metadata,
//     stream, …) is part of any prefix.
//   - The "cache_control" member of a block (its TTL included) is not
//     part of the hash: the upstream reads an earlier request's cache entry
//     from a later request whose breakpoints sit elsewhere, so the marker
//     cannot be part of the entry's identity. Prefix.TTL reports it
//     separately. Only a block's own top-level "cache_control" member is
//     dropped; the same key deeper inside a block (a tool parameter of that
//     name, a tool_use input) is content and is hashed.
//   - A string system prompt or message content is hashed as the single
//     text block it stands for ({"type":"text","text":…}), as the API
//     documents the two forms to be equivalent.
//
// # Canonical form
//
// Each block is hashed in a canonical JSON form, so that key order and
// whitespace do not matter but any change of content does: objects have
// their members sorted by key (bytewise on the decoded UTF-8; duplicate keys
// keep their order), there is no insignificant whitespace, and strings are
// re-escaped minimally (only `"`, `\` and control characters, with \b \f \n
// \r \t where they exist and lower-case \u00XX otherwise; "\u00e9", "\/" and
// "é", "/" hash the same; an unpaired surrogate escape becomes U+FFFD as
// encoding/json decodes it). Numbers are hashed by their literal text (1.0
// and 1 differ) and array order always matters.
//
// Strings are otherwise kept byte for byte (invalid UTF-8 included: sluice's
// API refuses such bodies before this package sees them).
//
// The encoder is written for this package rather than built on
// encoding/json, which is too slow for admission (json.Unmarshal of a
// 100 KB body into minimal structs alone takes about three times as long as
// Parse, and decoding to any then re-marshalling to sort keys about six
// times; see BenchmarkCanonical). Parse makes one validating scan of the
// whole body (as strict as json.Valid) that finds the blocks and their
// cache_control, then one pass over the prefix only — up to the last
// breakpoint — that re-emits each block canonically into a reused buffer
// and feeds it to a running SHA-256, summed at each breakpoint. It does not
// decode into Go values and allocates only its result.
//
// # Limits
//
// The hash predicts the upstream's cache identity from the request as sent;
// it is not the upstream's key. cache_control is read on top-level blocks
// only (tools[i], system[i], messages[i].content[j]); one nested inside a
// block (a tool_result's own content blocks) is hashed as content but not
// reported as a breakpoint. Parse does not check the API's rule that 1h
// breakpoints precede 5m ones.
package cachekey

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"math/bits"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf16"
	"unicode/utf8"
)

// MaxBreakpoints is the most cache_control breakpoints the API accepts in one
// request; more is an upstream 400.
const MaxBreakpoints = 4

// The TTLs a breakpoint may ask for.
const (
	TTL5m = 5 * time.Minute // the default, when cache_control has no ttl
	TTL1h = time.Hour
)

// Errors Parse wraps; test with errors.Is. Every error Parse returns wraps
// exactly one of them and its message (without the sentinel's text) says
// what is wrong and where, in words a client can act on.
var (
	// ErrInvalidJSON: the body is not well-formed JSON.
	ErrInvalidJSON = errors.New("request body is not valid JSON")
	// ErrInvalidRequest: the body is JSON but not shaped like a Messages
	// request where Parse has to look (tools, system, messages).
	ErrInvalidRequest = errors.New("request is not a valid Messages request")
	// ErrTooManyBreakpoints: more than MaxBreakpoints cache_control markers.
	ErrTooManyBreakpoints = errors.New("too many cache_control breakpoints")
	// ErrInvalidCacheControl: a cache_control value the API would refuse
	// (not an object, type other than "ephemeral", ttl other than "5m"/"1h").
	ErrInvalidCacheControl = errors.New("invalid cache_control")
)

// requestError is an error whose message is written for the client and
// which unwraps to one of the sentinels above.
type requestError struct {
	msg  string
	kind error
}

func (e *requestError) Error() string { return e.msg }
func (e *requestError) Unwrap() error { return e.kind }

func errorf(kind error, format string, args ...any) error {
	return &requestError{msg: fmt.Sprintf(format, args...), kind: kind}
}

// Section is the part of a request a breakpoint sits in.
type Section uint8

// The sections, in prefix order.
const (
	SectionTools Section = iota + 1
	SectionSystem
	SectionMessages
)

// String is the request field's name: "tools", "system" or "messages".
func (s Section) String() string {
	switch s {
	case SectionTools:
		return "tools"
	case SectionSystem:
		return "system"
	case SectionMessages:
		return "messages"
	}
	return "Section(" + strconv.Itoa(int(s)) + ")"
}

// Position locates a block in a request.
type Position struct {
	Section Section
	// Message is the index in messages[] when Section is SectionMessages,
	// and -1 otherwise.
	Message int
	// Block is the index in tools[] or system[], or in
	// messages[Message].content[].
	Block int
}

// String is the block's JSON path: "tools[2]", "system[0]",
// "messages[3].content[1]".
func (p Position) String() string {
	if p.Section == SectionMessages {
		return "messages[" + strconv.Itoa(p.Message) + "].content[" + strconv.Itoa(p.Block) + "]"
	}
	return p.Section.String() + "[" + strconv.Itoa(p.Block) + "]"
}

// Prefix is one cache breakpoint and the prefix it closes.
type Prefix struct {
	// Position is the block that carries the cache_control.
	Position Position
	// TTL is the breakpoint's cache lifetime: TTL5m or TTL1h.
	TTL time.Duration
	// Hash identifies the prefix: 64 lower-case hex digits of a SHA-256 over
	// the model and the canonical form of every block up to and including
	// this one (see the package documentation for exactly what is covered).
	// Two requests with equal hashes can share a cache entry.
	Hash string
	// Tokens is the estimated size of the prefix: the sum of the count
	// function over the raw JSON of every block in it (tool definitions,
	// system blocks, message content blocks; a string system prompt or
	// message content counts as its JSON string). Roles, tool_choice and
	// per-message framing are not counted.
	Tokens int
	// Cacheable reports Tokens >= the model's minimum cacheable length
	// (MinTokens, or WithMinTokens). The upstream neither writes nor reads a
	// shorter prefix.
	Cacheable bool
}

// Prefixes are a request's breakpoints in prefix order (tools, then system,
// then messages, each in array order). Tokens never decrease along it.
type Prefixes []Prefix

// Longest is the longest cacheable prefix: the one with the most Tokens
// among those that are Cacheable (the later one on a tie). ok is false when
// no breakpoint closes a cacheable prefix.
func (p Prefixes) Longest() (longest Prefix, ok bool) {
	for _, x := range p {
		if x.Cacheable && (!ok || x.Tokens >= longest.Tokens) {
			longest, ok = x, true
		}
	}
	return longest, ok
}

// Uncached is how many of a request's total input tokens are not served from
// the cache when cachedTokens of them are: total − cachedTokens, kept within
// [0, total]. For current models cache reads do not count against the
// input-tokens-per-minute limit (cache writes do), so this is what a request
// charges that limit when its prefix hits.
func Uncached(total int, cachedTokens int) int {
	if total <= 0 {
		return 0
	}
	if cachedTokens <= 0 {
		return total
	}
	if cachedTokens >= total {
		return 0
	}
	return total - cachedTokens
}

// MinTokens is the model's minimum cacheable prefix length: 2,048 tokens
// for a Haiku model (the name contains "haiku", in any case), 1,024 for any
// other (Sonnet, Opus).
func MinTokens(model string) int {
	if containsFold(model, "haiku") {
		return 2048
	}
	return 1024
}

func containsFold(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if strings.EqualFold(s[i:i+len(sub)], sub) {
			return true
		}
	}
	return false
}

// Option adjusts Parse.
type Option func(*options)

type options struct {
	min    int
	minSet bool
}

// WithMinTokens sets the minimum cacheable length in place of MinTokens(model),
// for models whose minimum differs from their family's. n <= 0 makes every
// prefix cacheable.
func WithMinTokens(n int) Option {
	return func(o *options) { o.min, o.minSet = max(n, 0), true }
}

func applyOptions(opts []Option) options {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	return o
}

// Parse finds the cache breakpoints in body, a Messages API request, and
// returns them in prefix order; a request without any has none (nil, nil).
//
// count estimates the tokens of a JSON fragment (the raw bytes of one block);
// it is called once for each block up to the last breakpoint, in order, and
// must neither keep nor modify the slice. A nil count counts 4 bytes a token.
//
// The error, when not nil, wraps ErrInvalidJSON, ErrInvalidRequest,
// ErrTooManyBreakpoints or ErrInvalidCacheControl and reads as advice to the
// client, e.g. "request has 5 cache_control breakpoints; the API accepts at
// most 4". Parse is safe for concurrent use.
func Parse(model string, body json.RawMessage, count func(json.RawMessage) int, opts ...Option) (Prefixes, error) {
	o := applyOptions(opts)
	if !o.minSet {
		o.min = MinTokens(model)
	}
	if count == nil {
		count = func(b json.RawMessage) int { return (len(b) + 3) / 4 }
	}

	st := statePool.Get().(*state)
	defer st.release()

	if err := st.scan(body); err != nil {
		return nil, err
	}
	st.all = append(append(append(st.all[:0], st.tools...), st.system...), st.msgs...)

	// The breakpoints, checked, in prefix order.
	for k := range st.all {
		it := &st.all[k]
		if it.cc == nil {
			continue
		}
		ttl, err := cacheControl(it.cc, it.pos())
		if err != nil {
			return nil, err
		}
		st.bps = append(st.bps, breakpoint{item: k, ttl: ttl})
	}
	if len(st.bps) == 0 {
		return nil, nil
	}
	if len(st.bps) > MaxBreakpoints {
		return nil, errorf(ErrTooManyBreakpoints,
			"request has %d cache_control breakpoints; the API accepts at most %d", len(st.bps), MaxBreakpoints)
	}

	// Hash and count every block up to the last breakpoint.
	out := make(Prefixes, 0, len(st.bps))
	h := st.h
	h.Reset()
	h.Write(version)
	st.record('m', append(st.buf[:0], model...))
	tokens := 0
	inMessages := false
	next := 0 // index into st.bps
	last := st.bps[len(st.bps)-1].item
	for k := 0; k <= last; k++ {
		it := &st.all[k]
		if it.sec == SectionMessages && !inMessages {
			inMessages = true
			st.recordValue('c', st.toolChoice)
			st.recordValue('k', st.thinking)
		}
		switch {
		case it.idx < 0: // a message starts: its role
			st.recordValue('r', it.raw)
			continue
		case it.str: // a string standing for one text block
			st.buf = append(st.buf[:0], `{"text":`...)
			st.canonString(it.raw, 0)
			st.buf = append(st.buf, `,"type":"text"}`...)
		default:
			st.buf = st.buf[:0]
			st.canonValue(it.raw, 0, true)
		}
		st.record(blockTag[it.sec], st.buf)
		tokens += max(count(it.raw), 0)
		if k == st.bps[next].item {
			out = append(out, Prefix{
				Position:  it.pos(),
				TTL:       st.bps[next].ttl,
				Hash:      st.hexSum(),
				Tokens:    tokens,
				Cacheable: tokens >= o.min,
			})
			next++
		}
	}
	return out, nil
}

// version starts every hash; change it with the encoding.
var version = []byte("sluice/cachekey/v1\x00")

var blockTag = [...]byte{SectionTools: 't', SectionSystem: 's', SectionMessages: 'b'}

// cacheControl checks a cache_control value (not null) and returns its TTL.
func cacheControl(raw []byte, at Position) (time.Duration, error) {
	if raw[0] != '{' {
		return 0, errorf(ErrInvalidCacheControl,
			`%s: cache_control must be an object such as {"type": "ephemeral"}`, at)
	}
	var typ, ttl []byte
	var haveType bool
	// raw has been validated: walking it cannot fail.
	sc := scanner{s: raw}
	_, _ = sc.object(0, func(key []byte, esc bool, vi int) (int, error) {
		end, err := sc.value(vi)
		switch {
		case keyIs(key, esc, "type"):
			typ, haveType = raw[vi:end], true
		case keyIs(key, esc, "ttl"):
			ttl = raw[vi:end]
		}
		return end, err
	})
	if !haveType || !stringIs(typ, "ephemeral") {
		got := "none"
		if haveType {
			got = string(typ)
		}
		return 0, errorf(ErrInvalidCacheControl,
			`%s: cache_control type must be "ephemeral", got %s`, at, truncate(got, 40))
	}
	switch {
	case ttl == nil || string(ttl) == "null" || stringIs(ttl, "5m"):
		return TTL5m, nil
	case stringIs(ttl, "1h"):
		return TTL1h, nil
	}
	return 0, errorf(ErrInvalidCacheControl,
		`%s: cache_control ttl must be "5m" or "1h", got %s`, at, truncate(string(ttl), 40))
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// stringIs reports whether raw is a JSON string whose value is want.
func stringIs(raw []byte, want string) bool {
	if len(raw) < 2 || raw[0] != '"' {
		return false
	}
	inner := raw[1 : len(raw)-1]
	return keyIs(inner, bytes.IndexByte(inner, '\\') >= 0, want)
}

// keyIs reports whether the raw (still escaped, unquoted) string key decodes
// to want.
func keyIs(key []byte, esc bool, want string) bool {
	if !esc {
		return string(key) == want
	}
	var buf [64]byte
	return string(appendUnescaped(buf[:0], key)) == want
}

// ---- per-call state ----

type item struct {
	raw []byte // the block's JSON; for a message start, its role's JSON (nil if none)
	cc  []byte // the block's own cache_control value, nil if none or null
	msg int    // index in messages[], -1 outside messages
	idx int    // index of the block in its array; -1 marks a message start
	sec Section
	str bool // raw is a JSON string standing for one text block
}

func (it *item) pos() Position {
	return Position{Section: it.sec, Message: it.msg, Block: it.idx}
}

type breakpoint struct {
	item int
	ttl  time.Duration
}

type member struct {
	key        []byte // decoded
	start, end int    // the member's canonical `"key":value` in state.buf
}

type state struct {
	sc                   scanner
	tools, system, msgs  []item
	all                  []item
	bps                  []breakpoint
	toolChoice, thinking []byte
	shapeErr             error
	buf                  []byte
	mem                  []member
	h                    hash.Hash
	sum                  [sha256.Size]byte
	hdr                  [9]byte
}

var statePool = sync.Pool{New: func() any { return &state{h: sha256.New()} }}

// maxKeep is the largest scratch buffer kept in the pool between calls.
const maxKeep = 1 << 20

func (st *state) release() {
	clear(st.tools)
	clear(st.system)
	clear(st.msgs)
	clear(st.all)
	clear(st.mem)
	st.tools, st.system, st.msgs, st.all = st.tools[:0], st.system[:0], st.msgs[:0], st.all[:0]
	st.bps, st.mem = st.bps[:0], st.mem[:0]
	st.toolChoice, st.thinking, st.sc, st.shapeErr = nil, nil, scanner{}, nil
	if cap(st.buf) > maxKeep {
		st.buf = nil
	}
	statePool.Put(st)
}

// hexSum is the hex form of the hash so far (which goes on).
func (st *state) hexSum() string {
	var x [2 * sha256.Size]byte
	hex.Encode(x[:], st.h.Sum(st.sum[:0]))
	return string(x[:])
}

// record adds one framed element to the hash: a tag, the length, the bytes.
func (st *state) record(tag byte, b []byte) {
	st.hdr[0] = tag
	binary.BigEndian.PutUint64(st.hdr[1:], uint64(len(b)))
	st.h.Write(st.hdr[:])
	st.h.Write(b)
}

// recordValue records the canonical form of a JSON value (absent = null).
func (st *state) recordValue(tag byte, raw []byte) {
	st.buf = st.buf[:0]
	if raw == nil {
		st.buf = append(st.buf, "null"...)
	} else {
		st.canonValue(raw, 0, false)
	}
	st.record(tag, st.buf)
}

// ---- pass 1: validate the body and find its blocks ----

func (st *state) scan(body []byte) error {
	st.sc = scanner{s: body}
	sc := &st.sc
	i := skipWS(body, 0)
	if i >= len(body) {
		return errorf(ErrInvalidJSON, "request body is empty")
	}
	if body[i] != '{' {
		end, err := sc.value(i)
		if err != nil {
			return err
		}
		if end = skipWS(body, end); end != len(body) {
			return sc.syntaxErr(end, "after the top-level value")
		}
		return errorf(ErrInvalidRequest, "request body must be a JSON object")
	}
	end, err := sc.object(i, func(key []byte, esc bool, vi int) (int, error) {
		switch {
		case keyIs(key, esc, "tools"):
			st.tools = st.tools[:0]
			return st.blocks(vi, SectionTools, -1, &st.tools)
		case keyIs(key, esc, "system"):
			st.system = st.system[:0]
			switch body[vi] {
			case '"':
				end, err := sc.value(vi)
				st.system = append(st.system, item{raw: body[vi:end], msg: -1, sec: SectionSystem, str: true})
				return end, err
			case 'n':
				return sc.value(vi)
			}
			return st.blocks(vi, SectionSystem, -1, &st.system)
		case keyIs(key, esc, "messages"):
			st.msgs = st.msgs[:0]
			return st.messages(vi)
		case keyIs(key, esc, "tool_choice"):
			end, err := sc.value(vi)
			st.toolChoice = nullable(body[vi:end])
			return end, err
		case keyIs(key, esc, "thinking"):
			end, err := sc.value(vi)
			st.thinking = nullable(body[vi:end])
			return end, err
		}
		return sc.value(vi)
	})
	if err != nil {
		return err
	}
	if end = skipWS(body, end); end != len(body) {
		return sc.syntaxErr(end, "after the top-level value")
	}
	return st.shapeErr
}

// shapeError notes the first way the request is not shaped as a Messages
// request; scanning goes on, as malformed JSON later on takes precedence.
func (st *state) shapeError(format string, args ...any) {
	if st.shapeErr == nil {
		st.shapeErr = errorf(ErrInvalidRequest, format, args...)
	}
}

func nullable(raw []byte) []byte {
	if string(raw) == "null" {
		return nil
	}
	return raw
}

// blocks reads an array of blocks (tools[], system[], content[]) at vi into
// *dst; null is an empty array.
func (st *state) blocks(vi int, sec Section, msg int, dst *[]item) (int, error) {
	sc := &st.sc
	s := sc.s
	switch s[vi] {
	case 'n':
		return sc.value(vi)
	case '[':
	default:
		switch sec {
		case SectionTools:
			st.shapeError("tools must be an array of tool definitions")
		case SectionSystem:
			st.shapeError("system must be a string or an array of text blocks")
		default:
			st.shapeError("messages[%d].content must be a string or an array of content blocks", msg)
		}
		return sc.value(vi)
	}
	return sc.array(vi, func(k, ei int) (int, error) {
		it := item{msg: msg, idx: k, sec: sec}
		if s[ei] != '{' {
			end, err := sc.value(ei)
			it.raw = s[ei:end]
			*dst = append(*dst, it)
			return end, err
		}
		end, err := sc.object(ei, func(key []byte, esc bool, vi int) (int, error) {
			end, err := sc.value(vi)
			if err == nil && keyIs(key, esc, "cache_control") {
				it.cc = nullable(s[vi:end]) // the last one wins, as in encoding/json
			}
			return end, err
		})
		it.raw = s[ei:end]
		*dst = append(*dst, it)
		return end, err
	})
}

func (st *state) messages(vi int) (int, error) {
	sc := &st.sc
	s := sc.s
	switch s[vi] {
	case 'n':
		return sc.value(vi)
	case '[':
	default:
		st.shapeError("messages must be an array of {role, content} objects")
		return sc.value(vi)
	}
	return sc.array(vi, func(m, ei int) (int, error) {
		if s[ei] != '{' {
			st.shapeError("messages[%d] must be an object with role and content", m)
			return sc.value(ei)
		}
		start := len(st.msgs)
		st.msgs = append(st.msgs, item{msg: m, idx: -1, sec: SectionMessages})
		var role []byte
		end, err := sc.object(ei, func(key []byte, esc bool, vi int) (int, error) {
			switch {
			case keyIs(key, esc, "role"):
				end, err := sc.value(vi)
				role = s[vi:end]
				return end, err
			case keyIs(key, esc, "content"):
				st.msgs = st.msgs[:start+1] // the last one wins
				if s[vi] == '"' {
					end, err := sc.value(vi)
					st.msgs = append(st.msgs, item{raw: s[vi:end], msg: m, sec: SectionMessages, str: true})
					return end, err
				}
				return st.blocks(vi, SectionMessages, m, &st.msgs)
			}
			return sc.value(vi)
		})
		st.msgs[start].raw = nullable(role)
		return end, err
	})
}

// ---- JSON scanning ----

// maxDepth bounds nesting, as encoding/json does.
const maxDepth = 10000

// scanner validates JSON (RFC 8259, as encoding/json.Valid: strings may hold
// invalid UTF-8) while walking it.
type scanner struct {
	s     []byte
	depth int
}

func (sc *scanner) syntaxErr(i int, context string) error {
	if i >= len(sc.s) {
		return errorf(ErrInvalidJSON, "request body is not valid JSON: unexpected end of input")
	}
	return errorf(ErrInvalidJSON, "request body is not valid JSON: unexpected %s at byte %d %s",
		quoteByte(sc.s[i]), i, context)
}

func quoteByte(c byte) string {
	if c >= 0x20 && c < 0x7f {
		return "'" + string(rune(c)) + "'"
	}
	return fmt.Sprintf("byte 0x%02x", c)
}

func skipWS(s []byte, i int) int {
	for i < len(s) && (s[i] == ' ' || s[i] == '\n' || s[i] == '\r' || s[i] == '\t') {
		i++
	}
	return i
}

// value validates the value starting at s[i] (i is past any whitespace) and
// returns the index just past it.
func (sc *scanner) value(i int) (int, error) {
	s := sc.s
	if i >= len(s) {
		return i, sc.syntaxErr(i, "")
	}
	switch c := s[i]; {
	case c == '"':
		end, _, err := sc.str(i)
		return end, err
	case c == '{':
		return sc.object(i, nil)
	case c == '[':
		return sc.array(i, nil)
	case c == 't':
		return sc.literal(i, "true")
	case c == 'f':
		return sc.literal(i, "false")
	case c == 'n':
		return sc.literal(i, "null")
	case c == '-' || c >= '0' && c <= '9':
		return sc.number(i)
	}
	return i, sc.syntaxErr(i, "where a value should start")
}

func (sc *scanner) literal(i int, lit string) (int, error) {
	if len(sc.s)-i >= len(lit) && string(sc.s[i:i+len(lit)]) == lit {
		return i + len(lit), nil
	}
	j := i
	for j < len(sc.s) && j-i < len(lit) && sc.s[j] == lit[j-i] {
		j++
	}
	return i, sc.syntaxErr(j, "in a literal")
}

func (sc *scanner) number(i int) (int, error) {
	s := sc.s
	j := i
	if s[j] == '-' {
		j++
	}
	switch {
	case j < len(s) && s[j] == '0':
		j++
	case j < len(s) && s[j] >= '1' && s[j] <= '9':
		j = digits(s, j+1)
	default:
		return i, sc.syntaxErr(j, "in a number")
	}
	if j < len(s) && s[j] == '.' {
		k := digits(s, j+1)
		if k == j+1 {
			return i, sc.syntaxErr(k, "after a decimal point")
		}
		j = k
	}
	if j < len(s) && (s[j] == 'e' || s[j] == 'E') {
		j++
		if j < len(s) && (s[j] == '+' || s[j] == '-') {
			j++
		}
		k := digits(s, j)
		if k == j {
			return i, sc.syntaxErr(k, "in an exponent")
		}
		j = k
	}
	return j, nil
}

func digits(s []byte, j int) int {
	for j < len(s) && s[j] >= '0' && s[j] <= '9' {
		j++
	}
	return j
}

const (
	lsb = 0x0101010101010101
	msb = 0x8080808080808080
)

// special marks the bytes of w (8 bytes, little-endian) that are '"', '\\'
// or below 0x20: the lowest marked byte is the first such byte (higher marks
// may be spurious), and none is marked when there is none.
func special(w uint64) uint64 {
	q := w ^ (lsb * '"')
	b := w ^ (lsb * '\\')
	return ((q-lsb)&^q | (b-lsb)&^b | (w-lsb*0x20)&^w) & msb
}

// nextSpecial is the index of the first '"', '\\' or control byte in s at
// or after j, or len(s).
func nextSpecial(s []byte, j int) int {
	for ; j+8 <= len(s); j += 8 {
		if m := special(binary.LittleEndian.Uint64(s[j:])); m != 0 {
			return j + bits.TrailingZeros64(m)/8
		}
	}
	for ; j < len(s); j++ {
		if c := s[j]; c == '"' || c == '\\' || c < 0x20 {
			return j
		}
	}
	return j
}

// str validates the string starting at s[i] == '"' and returns the index
// just past its closing quote and whether it holds any escape.
func (sc *scanner) str(i int) (end int, esc bool, err error) {
	s := sc.s
	j := i + 1
	for {
		if j = nextSpecial(s, j); j >= len(s) {
			return i, esc, sc.syntaxErr(j, "")
		}
		switch c := s[j]; {
		case c == '"':
			return j + 1, esc, nil
		case c == '\\':
			esc = true
			if j+1 >= len(s) {
				return i, esc, sc.syntaxErr(j+1, "")
			}
			switch s[j+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				j += 2
			case 'u':
				for k := j + 2; k < j+6; k++ {
					if k >= len(s) || unhex(s[k]) < 0 {
						return i, esc, sc.syntaxErr(k, "in a \\u escape")
					}
				}
				j += 6
			default:
				return i, esc, sc.syntaxErr(j+1, "in a string escape")
			}
		default: // c < 0x20
			return i, esc, sc.syntaxErr(j, "in a string (control characters must be escaped)")
		}
	}
}

func unhex(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'a' && c <= 'f':
		return int(c-'a') + 10
	case c >= 'A' && c <= 'F':
		return int(c-'A') + 10
	}
	return -1
}

// object validates the object starting at s[i] == '{'. For each member it
// calls fn with the raw key (between its quotes, still escaped), whether the
// key has escapes, and where the value starts; fn must validate the value
// and return the index past it. A nil fn just validates.
func (sc *scanner) object(i int, fn func(key []byte, esc bool, vi int) (int, error)) (int, error) {
	s := sc.s
	if sc.depth++; sc.depth > maxDepth {
		return i, errorf(ErrInvalidJSON, "request body is not valid JSON: nested too deeply")
	}
	i = skipWS(s, i+1)
	if i < len(s) && s[i] == '}' {
		sc.depth--
		return i + 1, nil
	}
	for {
		if i >= len(s) || s[i] != '"' {
			return i, sc.syntaxErr(i, "where an object key should start")
		}
		ke, esc, err := sc.str(i)
		if err != nil {
			return i, err
		}
		key := s[i+1 : ke-1]
		i = skipWS(s, ke)
		if i >= len(s) || s[i] != ':' {
			return i, sc.syntaxErr(i, "after an object key")
		}
		i = skipWS(s, i+1)
		if i >= len(s) {
			return i, sc.syntaxErr(i, "")
		}
		if fn != nil {
			i, err = fn(key, esc, i)
		} else {
			i, err = sc.value(i)
		}
		if err != nil {
			return i, err
		}
		i = skipWS(s, i)
		if i < len(s) && s[i] == ',' {
			i = skipWS(s, i+1)
			continue
		}
		if i < len(s) && s[i] == '}' {
			sc.depth--
			return i + 1, nil
		}
		return i, sc.syntaxErr(i, "after an object member")
	}
}

// array validates the array starting at s[i] == '['. For each element it
// calls fn with its index and where it starts; fn must validate it and
// return the index past it. A nil fn just validates.
func (sc *scanner) array(i int, fn func(k, ei int) (int, error)) (int, error) {
	s := sc.s
	if sc.depth++; sc.depth > maxDepth {
		return i, errorf(ErrInvalidJSON, "request body is not valid JSON: nested too deeply")
	}
	i = skipWS(s, i+1)
	if i < len(s) && s[i] == ']' {
		sc.depth--
		return i + 1, nil
	}
	for k := 0; ; k++ {
		if i >= len(s) {
			return i, sc.syntaxErr(i, "")
		}
		var err error
		if fn != nil {
			i, err = fn(k, i)
		} else {
			i, err = sc.value(i)
		}
		if err != nil {
			return i, err
		}
		i = skipWS(s, i)
		if i < len(s) && s[i] == ',' {
			i = skipWS(s, i+1)
			continue
		}
		if i < len(s) && s[i] == ']' {
			sc.depth--
			return i + 1, nil
		}
		return i, sc.syntaxErr(i, "after an array element")
	}
}

// ---- pass 2: canonical form ----

// canonValue appends the canonical form of the JSON value at raw[i] (which
// is valid JSON, past any whitespace) to st.buf and returns the index past
// it. top drops the object's own "cache_control" member.
func (st *state) canonValue(raw []byte, i int, top bool) int {
	switch c := raw[i]; {
	case c == '"':
		return st.canonString(raw, i)
	case c == '{':
		return st.canonObject(raw, i, top)
	case c == '[':
		st.buf = append(st.buf, '[')
		i = skipWS(raw, i+1)
		if raw[i] == ']' {
			st.buf = append(st.buf, ']')
			return i + 1
		}
		for {
			i = skipWS(raw, st.canonValue(raw, i, false))
			if raw[i] == ']' {
				st.buf = append(st.buf, ']')
				return i + 1
			}
			st.buf = append(st.buf, ',')
			i = skipWS(raw, i+1)
		}
	}
	// A number or a literal: its text, up to the next delimiter.
	j := i
	for j < len(raw) && raw[j] != ',' && raw[j] != '}' && raw[j] != ']' &&
		raw[j] != ' ' && raw[j] != '\n' && raw[j] != '\r' && raw[j] != '\t' {
		j++
	}
	st.buf = append(st.buf, raw[i:j]...)
	return j
}

func (st *state) canonObject(raw []byte, i int, top bool) int {
	open := len(st.buf)
	st.buf = append(st.buf, '{')
	base := len(st.mem)
	sorted := true
	i = skipWS(raw, i+1)
	for raw[i] != '}' {
		sc := scanner{s: raw}
		ke, esc, _ := sc.str(i)
		var key []byte
		if esc {
			key = appendUnescaped(nil, raw[i+1:ke-1])
		} else {
			key = raw[i+1 : ke-1]
		}
		i = skipWS(raw, ke)
		i = skipWS(raw, i+1) // past ':'
		if top && string(key) == "cache_control" {
			i, _ = sc.value(i)
		} else {
			if len(st.mem) > base {
				st.buf = append(st.buf, ',')
				if bytes.Compare(st.mem[len(st.mem)-1].key, key) > 0 {
					sorted = false
				}
			}
			start := len(st.buf)
			if esc {
				st.buf = appendQuoted(st.buf, key)
			} else {
				st.buf = append(st.buf, '"')
				st.buf = append(st.buf, key...)
				st.buf = append(st.buf, '"')
			}
			st.buf = append(st.buf, ':')
			i = st.canonValue(raw, i, false)
			st.mem = append(st.mem, member{key: key, start: start, end: len(st.buf)})
		}
		i = skipWS(raw, i)
		if raw[i] == ',' {
			i = skipWS(raw, i+1)
		}
	}
	if !sorted {
		ms := st.mem[base:]
		sortMembers(ms)
		// Lay the members out again in key order after the current end,
		// then move them back over the unsorted ones.
		tail := len(st.buf)
		for k, m := range ms {
			if k > 0 {
				st.buf = append(st.buf, ',')
			}
			st.buf = append(st.buf, st.buf[m.start:m.end]...)
		}
		n := copy(st.buf[open+1:], st.buf[tail:])
		st.buf = st.buf[:open+1+n]
	}
	clear(st.mem[base:])
	st.mem = st.mem[:base]
	st.buf = append(st.buf, '}')
	return i + 1
}

// sortMembers sorts an object's members by key, keeping duplicates in order.
func sortMembers(ms []member) {
	slices.SortStableFunc(ms, func(a, b member) int { return bytes.Compare(a.key, b.key) })
}

// canonString appends the canonical form of the valid JSON string at raw[i]
// to st.buf and returns the index past it: what appendQuoted makes of its
// decoded value, written in one pass that copies the runs between escapes
// (they need no change) and rewrites only the escapes.
func (st *state) canonString(raw []byte, i int) int {
	out := append(st.buf, '"')
	j, q := i+1, -1 // q: the next '"' at or after j, once known
	for {
		if q < j {
			q = j + bytes.IndexByte(raw[j:], '"')
		}
		b := bytes.IndexByte(raw[j:q], '\\')
		if b < 0 {
			out = append(out, raw[j:q]...)
			st.buf = append(out, '"')
			return q + 1
		}
		out = append(out, raw[j:j+b]...)
		j += b
		switch c := raw[j+1]; c {
		case '"', '\\', 'b', 'f', 'n', 'r', 't':
			out = append(out, '\\', c)
			j += 2
		case '/':
			out = append(out, '/')
			j += 2
		case 'u':
			r, rest := decodeU(raw[j:])
			j = len(raw) - len(rest)
			if r < 0x20 || r == '"' || r == '\\' {
				out = appendQuotedByte(out, byte(r))
			} else {
				out = utf8.AppendRune(out, r)
			}
		}
	}
}

// decodeU decodes the \u escape (or surrogate pair of them) at the start of
// s, as encoding/json does (an unpaired surrogate is U+FFFD), and returns the
// rest of s.
func decodeU(s []byte) (rune, []byte) {
	r := hex4(s[2:6])
	s = s[6:]
	if utf16.IsSurrogate(r) {
		if len(s) >= 6 && s[0] == '\\' && s[1] == 'u' {
			if d := utf16.DecodeRune(r, hex4(s[2:6])); d != utf8.RuneError {
				return d, s[6:]
			}
		}
		return utf8.RuneError, s
	}
	return r, s
}

// appendUnescaped appends the decoded value of a valid JSON string's inner
// bytes, as encoding/json decodes it (an unpaired surrogate is U+FFFD).
func appendUnescaped(dst, s []byte) []byte {
	for len(s) > 0 {
		b := bytes.IndexByte(s, '\\')
		if b < 0 {
			return append(dst, s...)
		}
		dst = append(dst, s[:b]...)
		s = s[b:]
		switch c := s[1]; c {
		case 'b':
			dst = append(dst, '\b')
		case 'f':
			dst = append(dst, '\f')
		case 'n':
			dst = append(dst, '\n')
		case 'r':
			dst = append(dst, '\r')
		case 't':
			dst = append(dst, '\t')
		case 'u':
			var r rune
			r, s = decodeU(s)
			dst = utf8.AppendRune(dst, r)
			continue
		default: // '"', '\\', '/'
			dst = append(dst, c)
		}
		s = s[2:]
	}
	return dst
}

func hex4(s []byte) rune {
	return rune(unhex(s[0])<<12 | unhex(s[1])<<8 | unhex(s[2])<<4 | unhex(s[3]))
}

// appendQuoted appends s as a canonical JSON string: only '"', '\\' and
// control characters are escaped.
func appendQuoted(dst, s []byte) []byte {
	dst = append(dst, '"')
	for start := 0; start < len(s); {
		i := nextSpecial(s, start)
		dst = append(dst, s[start:i]...)
		if i == len(s) {
			break
		}
		dst = appendQuotedByte(dst, s[i])
		start = i + 1
	}
	return append(dst, '"')
}

// appendQuotedByte appends the canonical escape of '"', '\\' or a control
// character.
func appendQuotedByte(dst []byte, c byte) []byte {
	switch c {
	case '"', '\\':
		return append(dst, '\\', c)
	case '\b':
		return append(dst, '\\', 'b')
	case '\f':
		return append(dst, '\\', 'f')
	case '\n':
		return append(dst, '\\', 'n')
	case '\r':
		return append(dst, '\\', 'r')
	case '\t':
		return append(dst, '\\', 't')
	}
	const hexdig = "0123456789abcdef"
	return append(dst, '\\', 'u', '0', '0', hexdig[c>>4], hexdig[c&0xf])
}
