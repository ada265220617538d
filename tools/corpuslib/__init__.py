"""The real-model corpus behind tools/corpus.py: model entries, input generation, metrics, runner."""
