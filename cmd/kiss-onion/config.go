package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/hashicorp/go-multierror"
	"github.com/pelletier/go-toml/v2"
)

// applyConfigFile sets every flag of fs that the command line left unset
// from the TOML file at path, whose keys are the flags' names ("cache-dir",
// or "cache_dir"). Every problem is reported, each with the file and line.
func applyConfigFile(fs *flag.FlagSet, path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read config: %w", err)
	}
	var doc map[string]any
	if err := toml.Unmarshal(data, &doc); err != nil {
		var de *toml.DecodeError
		if errors.As(err, &de) {
			row, col := de.Position()
			return fmt.Errorf("%s:%d:%d: %s", path, row, col, strings.TrimPrefix(de.Error(), "toml: "))
		}
		return fmt.Errorf("%s: %w", path, err)
	}
	onCommandLine := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { onCommandLine[f.Name] = true })
	lines := keyLines(data)
	keys := make([]string, 0, len(doc))
	for k := range doc {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return lines[keys[i]] < lines[keys[j]] })

	var errs *multierror.Error
	for _, key := range keys {
		name := strings.ReplaceAll(key, "_", "-")
		at := fmt.Sprintf("%s:%d", path, lines[key])
		f := fs.Lookup(name)
		if f == nil || name == "config" {
			errs = multierror.Append(errs, fmt.Errorf("%s: unknown key %q", at, key))
			continue
		}
		if onCommandLine[name] {
			continue
		}
		values := []any{doc[key]}
		if list, ok := doc[key].([]any); ok {
			values = list
		}
		for _, v := range values {
			var s string
			switch v := v.(type) {
			case string:
				s = v
			case bool, int64, float64:
				s = fmt.Sprint(v)
			default:
				errs = multierror.Append(errs, fmt.Errorf("%s: %s: want a string, number or boolean", at, key))
				continue
			}
			if err := f.Value.Set(s); err != nil {
				errs = multierror.Append(errs, fmt.Errorf("%s: %s: %v", at, key, err))
			}
		}
	}
	if errs != nil {
		errs.ErrorFormat = func(es []error) string {
			parts := make([]string, len(es))
			for i, e := range es {
				parts[i] = e.Error()
			}
			return strings.Join(parts, "; ")
		}
	}
	return errs.ErrorOrNil()
}

// keyLines finds the line of each top-level key of a flat TOML file.
func keyLines(data []byte) map[string]int {
	lines := map[string]int{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		l := strings.TrimSpace(sc.Text())
		key, _, ok := strings.Cut(l, "=")
		if !ok || strings.HasPrefix(l, "#") {
			continue
		}
		key = strings.Trim(strings.TrimSpace(key), `"'`)
		if _, seen := lines[key]; !seen {
			lines[key] = n
		}
	}
	return lines
}
