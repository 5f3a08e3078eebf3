package prune

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/atomicfile"
)

// Record is what the last prune of a cache did, kept in the state
// directory beside the metadata cache (prune-<id>.last), so that
// 'kiss-onion status' can tell when the cache was last pruned and how that
// went, whoever ran the prune.
type Record struct {
	Started         time.Time `json:"started"`
	Finished        time.Time `json:"finished"`
	Error           string    `json:"error,omitempty"` // empty when the prune succeeded
	Scanned         int64     `json:"scanned"`
	Kept            int64     `json:"kept"`
	DeletedNarInfos int64     `json:"deleted_narinfos"`
	Deleted         int64     `json:"deleted_files"`
	BytesFreed      int64     `json:"bytes_freed"`
	Summary         string    `json:"summary"` // Stats.String()
}

// recordPath returns the file of the last prune's record of cacheDir in
// stateDir.
func recordPath(stateDir, cacheDir string) string {
	return strings.TrimSuffix(metaPath(stateDir, cacheDir), ".meta") + ".last"
}

// saveRecord writes the record of a prune that started at start, ended
// with err and did st.
func saveRecord(stateDir, cacheDir string, start time.Time, st Stats, err error) error {
	r := Record{
		Started:         start.UTC(),
		Finished:        time.Now().UTC(),
		Scanned:         st.Scanned,
		Kept:            st.Kept,
		DeletedNarInfos: st.DeletedNarInfos,
		Deleted:         st.Deleted,
		BytesFreed:      st.BytesFreed,
		Summary:         st.String(),
	}
	if err != nil {
		r.Error = err.Error()
	}
	data, jerr := json.MarshalIndent(r, "", "  ")
	if jerr != nil {
		return jerr
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return err
	}
	return atomicfile.WriteFile(recordPath(stateDir, cacheDir), append(data, '\n'), 0o600)
}

// LastRun returns the record of the last prune of cacheDir that kept its
// metadata cache in stateDir (Options.StateDir), and false when there is
// none.
func LastRun(stateDir, cacheDir string) (Record, bool, error) {
	path := recordPath(stateDir, cacheDir)
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return Record{}, false, nil
	}
	if err != nil {
		return Record{}, false, fmt.Errorf("read the last prune's record: %w", err)
	}
	var r Record
	if err := json.Unmarshal(data, &r); err != nil {
		return Record{}, false, fmt.Errorf("read the last prune's record %s: %w", path, err)
	}
	return r, true, nil
}
