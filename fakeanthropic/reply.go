package fakeanthropic

import (
	"hash/fnv"
	"strings"
)

// replyWords are the output tokens of every reply, cycled. Each token is one
// word and a space, so that text deltas, words and usage.output_tokens all
// agree.
var replyWords = strings.Fields(`
	sure here is a short answer from the fake model which streams one word per
	token so that every client can count what it receives and check usage
	against the text the rate limits are real the words are not please keep
	calm and carry on queueing fairly while the buckets refill at their steady
	pace`)

// Stop reasons.
const (
	stopEndTurn      = "end_turn"
	stopMaxTokens    = "max_tokens"
	stopStopSequence = "stop_sequence"
)

// reply is the planned answer to one request: its tokens and why it stops.
type reply struct {
	tokens       []string // each a word and a trailing space
	stopReason   string
	stopSequence *string
}

func (r reply) text(n int) string { return strings.Join(r.tokens[:n], "") }

// planReply decides the answer to req. The length is the request's
// [[reply_tokens=N]] directive or defaultTokens, capped by max_tokens
// (stop_reason "max_tokens"). The words start at a point picked by a hash of
// the last user message, so replies differ between prompts but not between
// runs. A stop sequence stops the reply before the first word that contains
// it (stop_reason "stop_sequence"); sequences spanning words are not seen.
func planReply(req *messagesRequest, defaultTokens int) reply {
	want := defaultTokens
	if req.directives.replyTokens >= 0 {
		want = req.directives.replyTokens
	}
	r := reply{stopReason: stopEndTurn}
	n := want
	if req.maxTokens > 0 && n > req.maxTokens {
		n = req.maxTokens
		r.stopReason = stopMaxTokens
	}

	h := fnv.New32a()
	_, _ = h.Write([]byte(lastUserText(req.turns)))
	start := int(h.Sum32() % uint32(len(replyWords)))

	r.tokens = make([]string, 0, n)
	for i := range n {
		word := replyWords[(start+i)%len(replyWords)]
		for _, seq := range req.stopSequences {
			if seq != "" && strings.Contains(word, seq) {
				r.stopReason = stopStopSequence
				r.stopSequence = &seq
				return r
			}
		}
		r.tokens = append(r.tokens, word+" ")
	}
	return r
}
