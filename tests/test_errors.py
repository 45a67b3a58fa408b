"""What a script shows for the user's mistakes and for warnings they can act on."""

import warnings

from nas.errors import NasError, NasWarning, exit_on_user_error


def test_user_error_is_one_line_and_status_2(capsys):
    @exit_on_user_error
    def main() -> int:
        raise NasError("search_spaces/x.yaml: stages[0].kernel: 4 is not one of 3, 5, 7")

    assert main() == 2
    assert capsys.readouterr().err == "error: search_spaces/x.yaml: stages[0].kernel: 4 is not one of 3, 5, 7\n"


def test_our_warnings_are_one_line_and_others_keep_their_format(capsys):
    @exit_on_user_error
    def main() -> int:
        warnings.warn("latency_tables/t.json: measured elsewhere; rebuild it", NasWarning)
        warnings.warn("something from a library", DeprecationWarning)
        return 0

    passed_on = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, *args, **kwargs: passed_on.append(category)
        assert main() == 0
    assert capsys.readouterr().err.splitlines() == ["warning: latency_tables/t.json: measured elsewhere; rebuild it"]
    assert passed_on == [DeprecationWarning]  # other warnings go to the handler that was there before


def test_unusable_output_path_is_one_line(capsys, tmp_path):
    @exit_on_user_error
    def main() -> int:
        (tmp_path / "no" / "such" / "folder" / "out.json").write_text("{}")
        return 0

    assert main() == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "out.json: No such file or directory" in err and len(err.splitlines()) == 1


def test_ctrl_c_is_one_line_that_says_how_to_resume(capsys):
    @exit_on_user_error
    def main() -> int:
        raise KeyboardInterrupt

    assert main() == 130
    assert capsys.readouterr().err.strip() == "interrupted: run the same command again to resume"
