# The two commands of the README:  `make demo`  (set up + demo)  and  `make test`.
.PHONY: setup demo test
setup:
	bash scripts/setup.sh
demo: setup
	bash scripts/demo.sh
test: setup
	bash scripts/test.sh
