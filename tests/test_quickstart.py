"""quickstart.py (train.py --demo): the image the demo draws its detections on."""
import quickstart


def test_the_drawing_shows_the_image_with_the_most_large_faces(tmp_path):
    """A crowd of tiny faces (the most faces, none a small detector finds) is not chosen; among
    images with as many large faces, the first is."""
    crowd = ' '.join('10 10 8 9 1' for _ in range(30))
    lines = [f'crowd.jpg 30 {crowd}',
             'one.jpg 2 0 0 60 70 1 100 0 20 20 1',
             'two.jpg 3 0 0 50 40 1 100 100 45 45 1 5 5 10 10 1',
             'tie.jpg 2 0 0 50 50 1 100 100 45 45 1',
             'empty.jpg 0']
    path = tmp_path / 'face_val.txt'
    path.write_text('\n'.join(lines) + '\n')
    assert quickstart.demo_image(str(path)) == ('two.jpg', 3, 2)
